"""The chain finder: signatures, periods, validation, and the report of what was declined and why."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

from torch.fx import Graph, Node

from ..functionalize import DEFERRED_META
from ..fx_utils import COMPUTE_OPS
from .match import Analysis, ChainMatch, Declined, IntegerRun, LaggedRun
from .periods import _best_phase, _candidate_runs
from .signatures import node_signature
from .validate import IntegerState, Lagged, Split, autocast_states, transform_nodes, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Decline:
    """A declined candidate and where it lies: seq[lo:hi]; `short`: declined only for its length; `blanket`:
    declined for a reason every period of the region shares (or left to `passes/carry.py`)."""

    declined: Declined
    lo: int
    hi: int
    short: bool = False
    blanket: bool = False
    multiple: bool = False  # a period tried only as a multiple of an inner repeat


def _describe(blocks, reason: str) -> Declined:
    return Declined(first=blocks[0][0].name, last=blocks[-1][-1].name, length=len(blocks),
                    nodes_per_step=len(blocks[0]), reason=reason)


def _validate_region(seq: list[Node], start: int, p: int, k: int, min_length: int, chains: list,
                     declined: list[_Decline], regions: tuple[dict, dict], deferred: list) -> None:
    blocks = [tuple(seq[start + i * p: start + (i + 1) * p]) for i in range(k)]
    span = (start, start + p * k)
    if k < min_length:
        declined.append(_Decline(_describe(blocks, f"{k} steps < min_chain_length={min_length}"), *span, short=True))
        return
    try:
        chains.append(validate(blocks, *regions))
    except Lagged as e:
        declined.append(_Decline(_describe(blocks, e.reason), *span, blanket=True))
        deferred.append(LaggedRun(tuple(e.blocks), tuple(e.slots)))
    except IntegerState as e:  # reported as declined unless passes/defer.py moves the integer part out
        declined.append(_Decline(_describe(blocks, e.reason), *span, blanket=True))
        deferred.append(IntegerRun(tuple(e.blocks), tuple(e.positions)))
    except Split as e:
        useful = [(a, b) for a, b in e.pieces if b - a >= min_length]
        if not useful:
            declined.append(_Decline(_describe(blocks, e.reason), *span, blanket=e.every_period))
        log.debug("candidate %s..%s (%d steps) split: %s", blocks[0][0].name, blocks[-1][-1].name, k, e.reason)
        for a, b in useful:
            _validate_region(seq, start + a * p, p, b - a, min_length, chains, declined, regions, deferred)


def _summarise_declined(declined: list[_Decline], chain_spans: list[tuple[int, int]],
                        min_length: int) -> tuple[Declined, ...]:
    """The declined candidates worth reporting, in the order found: none inside a chain (sub-repeats tried
    before the chain's own period); a multiple period's only where no other period's was declined over it
    (that reason stands); and a short repeat inside a wider declined candidate (the 3-step repeats inside a
    transformer block declined for its dropout) counted in the widest one's reason, not listed."""
    def inside(d: _Decline, lo: int, hi: int) -> bool:
        return lo <= d.lo and d.hi <= hi

    kept = [d for d in declined if not any(inside(d, lo, hi) for lo, hi in chain_spans)]
    kept = [d for d in kept if not (d.multiple and any(not q.multiple and not q.short and q.lo < d.hi and d.lo < q.hi
                                                       for q in kept))]
    widest = sorted(kept, key=lambda d: d.lo - d.hi)
    parent = {id(d): next((q for q in widest if q is not d and q.hi - q.lo > d.hi - d.lo and inside(d, q.lo, q.hi)),
                          None) for d in kept if d.short}
    inner = Counter(id(q) for q in parent.values() if q is not None)
    result = []
    for d in kept:
        if parent.get(id(d)) is not None:
            continue
        n = inner[id(d)]
        reason = d.declined.reason if not n else (f"{d.declined.reason}; {n} shorter repeat{'s' * (n > 1)} "
                                                  f"inside, each < min_chain_length={min_length}")
        result.append(dataclasses.replace(d.declined, reason=reason))
    return tuple(result)


def find_chains(graph: Graph, min_length: int = 8) -> Analysis:
    """Find the chains of `graph` (read only). Chains are returned in graph order.

    Candidates are tried widest first; a candidate overlapping a chain already found is skipped. Periods
    that are multiples of an inner repeat (multi-stage integrator steps) are tried after the others, where
    those found no chain and did not decline the region for a reason every period shares."""
    seq = [n for n in graph.nodes if n.op in COMPUTE_OPS and not n.meta.get(DEFERRED_META)]
    interned: dict[tuple, int] = {}
    sig_ids = [interned.setdefault(node_signature(n), len(interned)) for n in seq]
    # Repeats from 3 steps up are candidates, so that shorter ones are reported as declined.
    shortest = min(3, min_length)
    regions = (autocast_states(graph), transform_nodes(graph))  # each node's autocast contexts; transforms
    occupied = [False] * len(seq)
    blanket = [False] * len(seq)  # declined for every period: multiples of the period are not tried there
    chains: list[ChainMatch] = []
    declined: list[_Decline] = []
    deferred: list = []
    for tier, runs in enumerate(_candidate_runs(sig_ids, shortest)):
        cands = []
        for p, a, end in runs:
            phi = _best_phase(seq, p, a, end, shortest)
            k = (end - a - phi) // p
            cands.append((p * k, p, a + phi, k))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        for _cover, p, start, k in cands:
            if any(occupied[start: start + p * k]) or (tier and any(blanket[start: start + p * k])):
                continue
            found: list[ChainMatch] = []
            n_declined = len(declined)
            _validate_region(seq, start, p, k, min_length, found, declined, regions, deferred)
            for i, d in enumerate(declined[n_declined:], n_declined):
                declined[i] = dataclasses.replace(d, multiple=bool(tier))
                if d.blanket:
                    blanket[d.lo: d.hi] = [True] * (d.hi - d.lo)
            if tier and not found:  # the widest multiple of a region is the one tried
                blanket[start: start + p * k] = [True] * (p * k)
            for c in found:
                pos = {n: i for i, n in enumerate(seq[start: start + p * k], start)}
                lo, hi = pos[c.first], pos[c.last]
                for i in range(lo, hi + 1):
                    occupied[i] = True
            chains.extend(found)
    order = {n: i for i, n in enumerate(seq)}
    chains.sort(key=lambda c: order[c.first])
    for c in chains:
        log.debug("chain %s..%s: %d steps of %d nodes", c.first.name, c.last.name, c.length, c.nodes_per_step)
    spans = [(order[c.first], order[c.last] + 1) for c in chains]
    return Analysis(chains=tuple(chains), declined=_summarise_declined(declined, spans, min_length),
                    lagged=tuple(r for r in deferred if isinstance(r, LaggedRun)),
                    integer_runs=tuple(r for r in deferred if isinstance(r, IntegerRun)))
