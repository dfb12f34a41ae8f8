"""Other ways to solve one op call, registered by the packages that provide them (``pcr_compile.distributed``
registers the layer-parallel solve when it is imported), so that the solver imports nothing above itself.

A forward route is ``(spec, call, z0, structure, tol, max_iters) -> (Z (L, B, w), SolveStats) | None``; a
backward route ``(spec, call, Zprev, Z, cot, diff_stacked, diff_inv, tol, max_iters) -> (pullback outputs,
SolveStats) | None``. None: the route does not take this call. The first route that takes a call solves it,
recorded with ``jacobian=name``.
"""

from __future__ import annotations

from collections.abc import Callable

FORWARD: list[tuple[str, Callable]] = []
BACKWARD: list[tuple[str, Callable]] = []


def register(name: str, forward: Callable, backward: Callable) -> None:
    """Add a route (once per name)."""
    if all(n != name for n, _ in FORWARD):
        FORWARD.append((name, forward))
        BACKWARD.append((name, backward))
