"""Chains under `DistributedDataParallel`: keep every chain in one piece of DDP's graph split.

Dynamo's DDP optimizer (`torch/_dynamo/backends/distributed.py`, Note [DDPOptimizer]) cuts the graph of a
DDP-wrapped model at gradient-bucket boundaries (parameters counted in reverse graph order up to
`bucket_cap_mb`) and compiles every piece separately, so that each bucket's all-reduce can start while the
backward of the pieces before it still runs. A chain cut there arrives at the backend as bucket-sized
pieces (a 256-layer, width-64 MLP under 1 MB buckets as 4 x 64), each solved on its own or declined under
`min_chain_length`.

A chain's adjoint produces every layer's gradient in one solve, so inside a chain there is no overlap to
protect. The backend therefore does DDP's split itself, chain-aware:

- With `torch._dynamo.config.optimize_ddp = False`, Dynamo hands the backend the whole graph. When a DDP
  module is active, `deeppcr` computes the buckets DDP's optimizer would choose (its own code, run on the
  same graph) and merges every run of buckets that a chain chosen for the parallel solve crosses into one,
  then splits and compiles the pieces exactly as DDP's optimizer does (`ChainAwareDDPOptimizer`). Buckets
  outside the chains keep their boundaries (and their all-reduce overlap); a chain's parameters join one
  bucket, whose all-reduce starts when the chain's adjoint has produced them all.
- With the default `optimize_ddp = True`, Dynamo builds its DDP optimizer for the frame and compiles through
  it before any backend sees the graph. Importing the backend installs `DeferringDDPOptimizer` in place of
  torch's class (`install_ddp_hook`): for a deeppcr compile its `compile_fn` hands the whole graph to the
  backend, which then does the chain-aware split above; for any other backend it is torch's own class,
  unchanged. `PCR_COMPILE_DDP_HOOK=0` in the environment leaves torch's class alone, and a torch whose
  Dynamo no longer imports the class from `torch._dynamo.backends.distributed` at each frame simply does
  not see the hook: then, as when a split reaches the backend by any other route, the pieces are compiled
  as they come (their gradients are still exact) and every piece is reported (`ddp_reports()`, log,
  trace artifact) with the advice to set `optimize_ddp = False`.

Trade-off: the merged bucket is as large as the chain's parameters, so its all-reduce is one large message
issued after the chain's backward rather than several overlapping its layers' backward. Every other
bucket keeps DDP's overlap. DDP's own reducer still buckets by `bucket_cap_mb` at run time (that is
independent of the graph split); only the compiled graph's boundaries change.

The merge reads the bucket list DDP's optimizer stashes on itself (`self.buckets = buckets`, "for
testing/debugging purposes") before it partitions: the list is merged in place there. That attribute is
a private detail of torch; `tests/test_distributed_ddp.py` checks it on the pinned torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch._dynamo.backends.distributed import Bucket, DDPOptimizer

log = logging.getLogger(__name__)

_STATE = threading.local()
PIECE_MARK = "DDPOptimizer intentional graph-break"


@dataclass(frozen=True)
class DDPSplitReport:
    """What DDP's split did to one graph and what the backend did about it.

    mode: "merged" (the backend split the whole graph, buckets merged over chains), "pieces" (Dynamo's DDP
    optimizer had already split the graph: `piece` of a split the backend cannot see whole).
    buckets: parameter bytes of the buckets DDP's optimizer chose, in graph order ("merged" only).
    cuts: chains the optimizer's boundaries would have cut, as `(first node, last node, pieces)`.
    merged: parameter bytes of the buckets compiled (after merging over chains).
    """

    mode: str
    bucket_cap_bytes: int
    buckets: tuple[int, ...] = ()
    cuts: tuple[tuple[str, str, int], ...] = ()
    merged: tuple[int, ...] = ()
    note: str = ""


_REPORTS: list[DDPSplitReport] = []


def ddp_reports() -> list[DDPSplitReport]:
    """Every DDP split report of this process, oldest first (cleared by `clear_ddp_reports`)."""
    return list(_REPORTS)


def clear_ddp_reports() -> None:
    _REPORTS.clear()


def _emit(report: DDPSplitReport) -> None:
    _REPORTS.append(report)
    log.info("deeppcr under DDP: %s", report)
    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": "pcr_compile_ddp_split", "encoding": "json"},
        payload_fn=lambda: json.dumps(asdict(report)))


def active_ddp_module():
    """The DDP module whose forward is being traced, or None (also None without torch.distributed)."""
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def is_ddp_piece(gm: torch.fx.GraphModule) -> bool:
    """Whether `gm` is one piece of a graph Dynamo's DDP optimizer has split."""
    return PIECE_MARK in str(getattr(gm, "compile_subgraph_reason", ""))


def in_split() -> bool:
    return getattr(_STATE, "splitting", False)


def _merge(buckets: list[Bucket], spans: list[tuple[int, int]], order: dict) -> tuple[list[Bucket], list]:
    """Merge every run of consecutive buckets (graph order) that one span of node positions touches."""
    def positions(b: Bucket) -> tuple[int, int]:
        idx = [order[n] for n in b.nodes if n in order]
        return (min(idx), max(idx)) if idx else (-1, -1)

    ranges = [positions(b) for b in buckets]
    group = list(range(len(buckets)))  # bucket -> group id (buckets are in graph order)
    cuts = []
    for lo, hi in spans:
        touched = [i for i, (a, z) in enumerate(ranges) if a <= hi and z >= lo and a >= 0]
        if len(touched) > 1:
            cuts.append(len(touched))
            for i in range(touched[0], touched[-1] + 1):
                group[i] = group[touched[0]]
    merged: list[Bucket] = []
    for i, b in enumerate(buckets):
        if i > 0 and group[i] == group[i - 1]:
            m = merged[-1]
            m.size += b.size
            m.params.extend(b.params)
            m.param_ids.extend(b.param_ids)
            m.nodes.extend(b.nodes)
        else:
            merged.append(Bucket(size=b.size, params=list(b.params), nodes=list(b.nodes), param_ids=list(b.param_ids)))
    return merged, cuts


class ChainAwareDDPOptimizer(DDPOptimizer):
    """DDP's graph split with the buckets a chain crosses merged into one (see the module docstring).

    `spans`: `(first, last)` node names of the chains to keep whole, in `gm`'s graph."""

    def __init__(self, bucket_bytes_cap: int, backend_compile_fn: Callable, spans: list[tuple[str, str]],
                 first_bucket_cap: int | None = None, probe: bool = False):
        super().__init__(bucket_bytes_cap, backend_compile_fn, first_bucket_cap)
        self._spans = spans
        self._probe = probe  # stop right after bucketing (explain_ddp)
        self._order: dict = {}
        self.report: DDPSplitReport | None = None

    @property
    def buckets(self) -> list[Bucket]:
        return self._buckets

    @buckets.setter
    def buckets(self, buckets: list[Bucket]) -> None:
        # DDPOptimizer.compile_fn assigns its bucket list here before it partitions the graph with that
        # same list: merging it in place makes the partition keep every chain whole.
        by_name = {n.name: i for n, i in self._order.items()}
        spans = [(by_name[a], by_name[b]) for a, b in self._spans if a in by_name and b in by_name]
        before = [b.size for b in buckets]
        merged, cuts = _merge(buckets, spans, self._order)
        buckets[:] = merged
        self._buckets = buckets
        cut_names = tuple((a, b, k) for (a, b), k in zip(self._spans, cuts))
        self.report = DDPSplitReport(
            mode="merged", bucket_cap_bytes=self.bucket_bytes_cap, buckets=tuple(before), cuts=cut_names,
            merged=tuple(b.size for b in buckets),
            note=(f"DDP's buckets would cut {len(cuts)} chain(s); merged into one bucket each" if cuts
                  else "no chain crosses a bucket boundary"))
        if self._probe:
            raise _Probed

    def compile_fn(self, gm, example_inputs, **kw):
        self._order = {n: i for i, n in enumerate(gm.graph.nodes)}
        _STATE.splitting = True
        try:
            return super().compile_fn(gm, example_inputs, **kw)
        finally:
            _STATE.splitting = False


class _Probed(Exception):
    """Raised by a probing optimizer once its buckets are known: nothing is split or compiled."""


def explain_ddp(model, *example_inputs, bucket_cap_mb: float = 25.0, options: dict | None = None,
                **example_kwargs) -> list[DDPSplitReport]:
    """What DDP's graph split would do to each Dynamo graph of `model` (the module DDP would wrap) under
    `bucket_cap_mb`, and the buckets deeppcr compiles instead (what it does under DDP);
    no process group needed, nothing compiled. Resets Dynamo's caches, as `pcr_compile.explain`."""
    from pcr_compile.options import Options

    opts = Options.parse(options)
    out = torch._dynamo.explain(model)(*example_inputs, **example_kwargs)
    cap = int(bucket_cap_mb * 1024 * 1024)
    reports = []
    for gm in out.graphs:
        opt = ChainAwareDDPOptimizer(cap, None, chain_spans(gm, opts), probe=True,
                                     first_bucket_cap=min(cap, torch.distributed._DEFAULT_FIRST_BUCKET_BYTES))
        opt._order = {n: i for i, n in enumerate(gm.graph.nodes)}
        try:
            DDPOptimizer.compile_fn(opt, gm, [])
        except _Probed:
            pass
        reports.append(opt.report)
    torch._dynamo.reset()
    return reports


def chain_spans(gm: torch.fx.GraphModule, options) -> list[tuple[str, str]]:
    """`(first, last)` node names of the chains the backend would solve in parallel in `gm` (analysis only)."""
    from pcr_compile.backend import prepared

    _, plan = prepared(gm, options, copy=False)
    names = {n.name for n in gm.graph.nodes}
    spans = []
    for pc in plan.chains:
        if pc.decision.decision != "parallel":
            continue
        first, last = pc.match.blocks[0][0].name, pc.match.blocks[-1][-1].name
        if first in names and last in names:
            spans.append((first, last))
    return spans


def compile_under_ddp(gm, example_inputs, options, compile_piece: Callable):
    """The backend's route when a DDP module is active; None when the ordinary route applies.

    `compile_piece(gm, example_inputs)` compiles one graph (or piece) the ordinary way."""
    if in_split() or active_ddp_module() is None:
        return None
    from torch._dynamo.utils import get_optimize_ddp_mode

    ddp = active_ddp_module()
    if is_ddp_piece(gm):
        _emit(DDPSplitReport(
            mode="pieces", bucket_cap_bytes=int(ddp.bucket_bytes_cap),
            note="Dynamo's DDP optimizer split this graph at gradient-bucket boundaries before deeppcr saw it: "
                 "a chain crossing a boundary is solved piecewise (exact, more chain ops). Set "
                 "torch._dynamo.config.optimize_ddp = False (or leave the backend's DDP hook on: PCR_COMPILE_DDP_HOOK "
                 "unset) to let deeppcr split the graph keeping chains whole."))
        return None
    if get_optimize_ddp_mode() not in ("no_optimization", "ddp_optimizer"):  # python_reducer: compiled autograd
        return None
    spans = chain_spans(gm, options)
    cap = int(ddp.bucket_bytes_cap)
    # Dynamo's own DDPOptimizer asserts first bucket <= cap (1 MB default first bucket); keep it valid.
    opt = ChainAwareDDPOptimizer(cap, compile_piece, spans,
                                 first_bucket_cap=min(cap, torch.distributed._DEFAULT_FIRST_BUCKET_BYTES))
    compiled = opt.compile_fn(gm, example_inputs)
    if opt.report is not None:
        _emit(opt.report)
    return compiled


# -- the default `optimize_ddp = True`: let deeppcr see the whole graph ---------------------------------------

_TORCH_DDP_OPTIMIZER = DDPOptimizer


def _is_deeppcr(compile_fn) -> bool:
    """Whether Dynamo's backend callable (WrapBackendDebug -> torch.compile's wrapper -> backend) is deeppcr."""
    from pcr_compile.backend import deeppcr

    seen, todo = set(), [compile_fn]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn is deeppcr or getattr(fn, "__func__", None) is deeppcr:
            return True
        todo.extend(getattr(fn, a, None) for a in ("_torchdynamo_orig_backend", "_torchdynamo_orig_callable",
                                                    "compiler_fn", "__wrapped__", "func"))
    return False


class DeferringDDPOptimizer(_TORCH_DDP_OPTIMIZER):
    """Torch's DDP optimizer, except that a deeppcr compile gets the whole graph (see the module docstring).

    For deeppcr, a bucket cap under DDP's 1 MB first bucket is accepted (torch's class asserts first bucket <=
    cap, so `bucket_cap_mb < 1` fails to compile with any backend); the split then uses the cap for both."""

    def __init__(self, bucket_bytes_cap, backend_compile_fn, first_bucket_cap=None):
        self.defers = _is_deeppcr(backend_compile_fn)
        if first_bucket_cap is None and self.defers:
            first_bucket_cap = min(bucket_bytes_cap, torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)
        super().__init__(bucket_bytes_cap, backend_compile_fn, first_bucket_cap)

    def compile_fn(self, gm, example_inputs, **compiler_configs):
        if self.defers:
            log.debug("deeppcr: Dynamo's DDP split deferred to the backend (chain-aware buckets)")
            return self.backend_compile_fn(gm, example_inputs, **compiler_configs)
        return super().compile_fn(gm, example_inputs, **compiler_configs)


def install_ddp_hook() -> bool:
    """Put `DeferringDDPOptimizer` where Dynamo's frame conversion imports its DDP optimizer from (idempotent).

    Returns whether the hook is installed. `PCR_COMPILE_DDP_HOOK=0` opts out."""
    import torch._dynamo.backends.distributed as dist_backend

    if os.environ.get("PCR_COMPILE_DDP_HOOK", "1") == "0":
        return False
    if dist_backend.DDPOptimizer is _TORCH_DDP_OPTIMIZER:
        dist_backend.DDPOptimizer = DeferringDDPOptimizer
    return issubclass(dist_backend.DDPOptimizer, DeferringDDPOptimizer)
