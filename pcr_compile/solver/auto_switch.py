"""mode="auto" at run time: a chain whose solve did not pay runs sequentially from then on (for those shapes)."""

from __future__ import annotations

import logging
import threading

from .call import ChainSpec

log = logging.getLogger(__name__)

# mode="auto": a solve that needed more than this fraction of the chain's steps in iterations (or fell back)
# switches its chain to sequential evaluation for later calls with the same shapes. On the launch-count
# model (benchmarks: a Newton / Picard iteration launches the block's ops once over all steps, plus the
# linear solve, the residual and its host read, about 10 launches and a sync more), an iteration of a
# small block (2-4 ops: a linear layer and an activation) costs what 3-6 sequential steps cost, and one of
# a transformer block (20+ ops) what 1.5 steps cost; above L/4 iterations the parallel solve cannot beat L
# sequential steps for the small blocks, and at most ~2.5x for the large ones, which is not worth its
# extra work. A chain that takes ~L iterations (12-layer transformer stacks under Picard, samplers on
# random-weight denoisers) is switched after its first call.
SWITCH_FRACTION = 0.25
_SWITCHED: dict[tuple, str] = {}  # (chain op, direction, shapes) -> why it runs sequentially now
_switch_lock = threading.Lock()


def _key(spec: ChainSpec, direction: str, states) -> tuple:
    return (spec.name, direction, tuple((tuple(s.shape), s.dtype, s.device.type) for s in states))


def switched(name: str) -> list[str]:
    """Why chain op `name` runs sequentially now (mode="auto" learned it from a solve), one reason per
    direction and shape; [] when it was never switched."""
    with _switch_lock:
        return [why for (n, _, _), why in _SWITCHED.items() if n == name]


def learn(spec: ChainSpec, direction: str, states, L: int, stats) -> None:
    """Remember a solve that did not pay (mode="auto"): its later calls with these shapes run sequentially."""
    if not (stats.fell_back or stats.iterations > SWITCH_FRACTION * L):
        return
    what = f"fell back ({stats.reason})" if stats.fell_back else f"took {stats.iterations} iterations"
    why = (f"auto: the first {direction} solve {what} for {L} steps (> {SWITCH_FRACTION:g} L iterations do not "
           "pay); sequential from then on for these shapes")
    with _switch_lock:
        _SWITCHED.setdefault(_key(spec, direction, states), why)
    log.info("deeppcr: %s %s", spec.name, why)


def learned(spec: ChainSpec, direction: str, states) -> str | None:
    """Why this chain runs sequentially now for these shapes (a solve of it did not pay), or None."""
    with _switch_lock:
        return _SWITCHED.get(_key(spec, direction, states))
