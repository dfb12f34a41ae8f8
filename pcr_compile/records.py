"""Solve records: what each chain solve did at run time, collected by :func:`record_solves`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_local = threading.local()


@dataclass(frozen=True)
class SolveRecord:
    """One solve of one chain: a forward Newton/Picard solve or a backward adjoint solve."""

    chain: str  # the chain op's name in the pcr_compile namespace, e.g. "chain_3f2a9c0d1e2b4a5f"
    length: int  # steps in the chain
    iterations: int  # linear solves (Newton / Picard / refinement iterations) performed
    residual: float  # final residual: max over steps of |z_l - f_l(z_{l-1})| / max |f_l(z_{l-1})|
    converged: bool  # the parallel iteration reached the tolerance
    fell_back: bool  # the chain was finished (partly) by sequential evaluation
    direction: str  # "forward" | "backward"
    jacobian: str = ""  # the strategy that ran: dense | diagonal | identity | zero | sequential
    prefix: int = 0  # steps that had converged when the parallel iteration stopped
    residuals: tuple[float, ...] = field(default_factory=tuple)  # residual after 0, 1, ... iterations
    reason: str = ""  # why it fell back, if it did
    seconds: float = 0.0


def _collectors() -> list[list[SolveRecord]]:
    if not hasattr(_local, "collectors"):
        _local.collectors = []
    return _local.collectors


def emit(record: SolveRecord) -> None:
    for c in _collectors():
        c.append(record)


@contextlib.contextmanager
def record_solves() -> Iterator[list[SolveRecord]]:
    """Collect one :class:`SolveRecord` per chain solve run inside the block (this thread only).

    >>> with pcr_compile.record_solves() as solves:
    ...     y = compiled(x); y.sum().backward()
    >>> [(s.direction, s.iterations) for s in solves]
    """
    records: list[SolveRecord] = []
    _collectors().append(records)
    try:
        yield records
    finally:
        active = _collectors()
        del active[next(i for i, c in enumerate(active) if c is records)]  # by identity: lists compare equal
