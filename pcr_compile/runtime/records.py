"""Solve records: what each chain solve did at run time, collected by :func:`record_solves`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

# Collectors are process-wide, not per thread: the autograd engine runs CUDA backward work on its own
# device threads, and a solve run there inside the `with` block must be recorded too.
_lock = threading.Lock()
_active: list[list[SolveRecord]] = []


@dataclass(frozen=True)
class SolveRecord:
    """One solve of one chain: a forward Newton/Picard solve or a backward adjoint solve."""

    chain: str  # the chain op's name in the pcr_compile namespace, e.g. "chain_3f2a9c0d1e2b4a5f"
    length: int  # steps in the chain
    iterations: int  # linear solves (Newton / Picard / refinement iterations) performed
    # final residual: max over steps l of rho_l = max over rows b of |z_lb - f_l(z_{l-1})_b| / |f_l(z_{l-1})_b|
    # (max norms; each carried tensor against its own size; the adjoint: lam against its right-hand side).
    # The result is within tol of each step's own size in this sense (solver/residual.py derives what that
    # means for the error against sequential evaluation).
    residual: float
    converged: bool  # the parallel iteration reached the tolerance
    fell_back: bool  # the chain was finished (partly) by sequential evaluation
    direction: str  # "forward" | "backward"
    jacobian: str = ""  # the strategy that ran: dense | diagonal | identity | zero | sequential
    prefix: int = 0  # steps that had converged when the parallel iteration stopped
    residuals: tuple[float, ...] = field(default_factory=tuple)  # residual after 0, 1, ... iterations
    reason: str = ""  # why it fell back, if it did
    seconds: float = 0.0
    # What the solve and its check cost: batched evaluations of every step (forward: the chain; backward:
    # its vector-Jacobian product), the last of which certifies the result (its residual is the one
    # reported), and steps evaluated one at a time by a fallback.
    evaluations: int = 0
    sequential_steps: int = 0
    # Sampler solves (solver/sampler.py): the update whose iterates were kept, "jacobian/accel" ("scalar/picard",
    # "identity/auto"; with sampler_jacobian="auto" the race's winner), and the denoiser work in single steps
    # (a round over n steps counts n, both candidates' rows while they race; sequential sampling: `length`).
    chosen: str = ""
    step_evaluations: int = 0


def emit_solve(chain: str, length: int, direction: str, jacobian: str, stats, seconds: float) -> None:
    """Record one solve from its statistics (``solver.newton.SolveStats``) in every open collector."""
    emit(SolveRecord(chain=chain, length=length, iterations=stats.iterations, residual=stats.residual,
                     converged=stats.converged, fell_back=stats.fell_back, direction=direction, jacobian=jacobian,
                     prefix=stats.prefix, residuals=tuple(stats.residuals), reason=stats.reason, seconds=seconds,
                     evaluations=stats.evaluations, sequential_steps=stats.sequential_steps,
                     chosen=getattr(stats, "chosen", ""), step_evaluations=getattr(stats, "step_evaluations", 0)))


def emit(record: SolveRecord) -> None:
    with _lock:
        for c in _active:
            c.append(record)


@contextlib.contextmanager
def record_solves() -> Iterator[list[SolveRecord]]:
    """Collect one :class:`SolveRecord` per chain solve run while the block is open, in any thread (the
    autograd engine's device threads included: a backward run there is recorded too).

    >>> with pcr_compile.record_solves() as solves:
    ...     y = compiled(x); y.sum().backward()
    >>> [(s.direction, s.iterations) for s in solves]
    """
    records: list[SolveRecord] = []
    with _lock:
        _active.append(records)
    try:
        yield records
    finally:
        with _lock:
            del _active[next(i for i, c in enumerate(_active) if c is records)]  # by identity: lists compare equal
