"""The report types of :func:`pcr_compile.explain` and of the backend's trace artifact: plain frozen data with a
stable JSON form (``Report.to_dict``; within one ``schema_version`` keys are only added). They depend on nothing
above ``passes/``, so ``api.py`` and ``backend.py`` both import them without importing each other."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate

from .passes.chains import Declined
from .passes.chains.validate import autocast_compute_dtype

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ChainReport:
    """One chain found in one graph."""

    graph: int
    first: str  # first node of the first step
    last: str  # last node of the last step
    length: int  # steps
    nodes_per_step: int
    kind: str  # "layers" | "sampler" | "recurrence" | "integrator" (passes.chains.chain_kind)
    state_shape: tuple[int, ...]  # shape of the (first) carried state
    state_shapes: tuple[tuple[int, ...], ...]  # every carried state
    per_step_inputs: int  # inputs stacked along the steps (layer parameters, per-step tensors)
    lifted_constants: int  # per-step constants lifted out of the graph (timesteps, coefficients)
    invariant_inputs: int  # inputs shared by every step
    jacobian: str
    decision: str  # "parallel" | "sequential"
    reason: str
    exposed_values: int = 0  # values of earlier steps read after the chain (from the solved trajectory)
    autocast: str = ""  # the dtype torch.autocast runs the steps in on the state's device ("" outside autocast)


@dataclass(frozen=True)
class DeclinedReport(Declined):
    """A declined candidate (first, last, length, nodes_per_step, reason) of graph `graph`."""

    graph: int = 0


@dataclass(frozen=True)
class GraphSummary:
    index: int
    nodes: int
    ops: dict[str, int]


@dataclass
class Report:
    """What `explain` found; `str(report)` is a readable table, `report.to_json()` a stable document."""

    graphs: list[GraphSummary] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    # Why Dynamo ran a frame eagerly, uncompiled (torch 2.13 skips a whole frame on a graph break inside a
    # loop): its messages, as `torch._dynamo.utils.counters["unimplemented"]` holds them.
    skipped_frames: list[str] = field(default_factory=list)
    chains: list[ChainReport] = field(default_factory=list)
    declined: list[DeclinedReport] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "options": self.options,
            "graph_count": len(self.graphs),
            "graph_break_count": len(self.graph_breaks),
            "graph_breaks": list(self.graph_breaks),
            "skipped_frames": list(self.skipped_frames),
            "graphs": [asdict(g) for g in self.graphs],
            "chains": [asdict(c) for c in self.chains],
            "declined": [asdict(d) for d in self.declined],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def chain_table(self, graph: int | None = None) -> str:
        rows = [[c.graph, c.first, c.last, c.length, c.nodes_per_step,
                 c.kind + (f" (autocast {c.autocast})" if c.autocast else ""), "x".join(map(str, c.state_shape)),
                 c.per_step_inputs + c.lifted_constants, c.jacobian, c.decision, c.reason]
                for c in self.chains if graph is None or c.graph == graph]
        if not rows:
            return "no chains found"
        return tabulate(rows, headers=["graph", "first", "last", "steps", "nodes/step", "kind", "state",
                                       "per-step in", "jacobian", "decision", "reason"])

    def declined_table(self, graph: int | None = None) -> str:
        rows = [[d.graph, d.first, d.last, d.length, d.nodes_per_step, d.reason]
                for d in self.declined if graph is None or d.graph == graph]
        if not rows:
            return "no candidates declined"
        return tabulate(rows, headers=["graph", "first", "last", "steps", "nodes/step", "reason"])

    def __str__(self) -> str:
        lines = [f"Graphs: {len(self.graphs)}   Graph breaks: {len(self.graph_breaks)}   "
                 f"Chains: {len(self.chains)}   Declined: {len(self.declined)}"]
        for i, reason in enumerate(self.graph_breaks, 1):
            lines.append(f"  break {i}: {reason}")
        for reason in self.skipped_frames:
            lines.append(f"  run eagerly, not compiled: {skip_summary(reason)}")
        lines += ["", "Chains:", self.chain_table(), "", "Declined candidates:", self.declined_table()]
        return "\n".join(lines)


def skip_summary(message: str) -> str:
    """One line of a frame-skip message of Dynamo's: each chained break's first line and explanation."""
    parts = []
    for part in message.split("*** While handling this graph break, another graph break occurred: ***"):
        lines = [ln.strip() for ln in part.splitlines() if ln.strip()]
        if not lines:
            continue
        why = next((ln.removeprefix("Explanation:").strip() for ln in lines[1:] if ln.startswith("Explanation:")), "")
        parts.append(f"{lines[0]} ({why})" if why else lines[0])
    return "; then ".join(parts)


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    c = Counter()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            c[n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))] += 1
    return dict(sorted(c.items()))


def chain_report(graph_index: int, planned) -> ChainReport:
    m, d = planned.match, planned.decision
    shapes = tuple(tuple(int(s) if not isinstance(s, torch.SymInt) else str(s) for s in v.shape)
                   for v in m.state_values())
    return ChainReport(graph=graph_index, first=m.first.name, last=m.last.name, length=m.length,
                       nodes_per_step=m.nodes_per_step, kind=m.kind, state_shape=shapes[0], state_shapes=shapes,
                       per_step_inputs=len(m.per_step) + len(m.sliced) + len(m.folded),
                       lifted_constants=len(m.lifted),
                       invariant_inputs=len(m.invariants), jacobian=d.jacobian, decision=d.decision,
                       reason=d.reason, exposed_values=len(m.exposed), autocast=_autocast_name(m))


def _autocast_name(m) -> str:
    """The lowest-precision dtype torch.autocast computes the steps' values in, by name ("" for none)."""
    dtype = autocast_compute_dtype(m)
    return str(dtype).removeprefix("torch.") if dtype is not None else ""
