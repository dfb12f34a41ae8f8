"""`pcr_compile.explain`: what the backend finds in a model and what it would do, without compiling.

The report mirrors `torch._dynamo.explain` (graphs, graph breaks, ops per graph) and adds, per graph,
the chains found (with their decision, Jacobian strategy and reason) and the candidates declined.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate

from .options import Options
from .passes.chains import Declined

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
            "graphs": [asdict(g) for g in self.graphs],
            "chains": [asdict(c) for c in self.chains],
            "declined": [asdict(d) for d in self.declined],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def chain_table(self, graph: int | None = None) -> str:
        rows = [[c.graph, c.first, c.last, c.length, c.nodes_per_step, c.kind, "x".join(map(str, c.state_shape)),
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
        lines += ["", "Chains:", self.chain_table(), "", "Declined candidates:", self.declined_table()]
        return "\n".join(lines)


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
                       reason=d.reason, exposed_values=len(m.exposed))


def _with_run_time_switch(report: ChainReport, planned, options: Options) -> ChainReport:
    """mode="auto" switches a chain whose solve did not pay to sequential at run time (solve.SWITCH_FRACTION):
    say so in the chain's reason when that chain's op has been switched in this process."""
    if options.mode != "auto" or planned.decision.decision != "parallel":
        return report
    from dataclasses import replace

    from . import solve
    from .backend import chain_spec

    why = solve.switched(chain_spec(planned.match).name)
    if not why:
        return report
    return replace(report, reason=f"{report.reason}; switched to sequential at run time: {why[0]}")


def report_graph(report: Report, index: int, gm: torch.fx.GraphModule, options: Options):
    """Add one graph's analysis to `report`; returns the plan."""
    from .backend import prepared

    _, plan = prepared(gm, options, copy=False)  # read only
    report.graphs.append(GraphSummary(index=index, nodes=len(gm.graph.nodes), ops=op_counts(gm)))
    report.chains.extend(_with_run_time_switch(chain_report(index, pc), pc, options) for pc in plan.chains)
    report.declined.extend(DeclinedReport(graph=index, **asdict(d)) for d in plan.declined)
    return plan


def explain(model, *example_inputs, options: dict | None = None, **example_kwargs) -> Report:
    """Trace `model(*example_inputs, **example_kwargs)` with Dynamo and report the chains the deeppcr backend
    would find.

    Pass the keyword inputs the compiled model will be called with (`attention_mask=...`, `use_cache=False`):
    they change the graph, so a report without them is on a different graph from the one compiled. (A keyword
    input named `options` cannot be passed: that name is this function's.)

    Returns a :class:`Report`: `.chains` (length, kind, decision, reason, jacobian, state_shape, ...),
    `.declined` (candidates rejected, with reasons), `.graphs` and `.graph_breaks`; `str(report)` is a
    table. Nothing is compiled and the model is not changed; like `torch._dynamo.explain`, it resets Dynamo's
    caches (compiled functions are recompiled on their next call).
    """
    opts = Options.parse(options)
    out = torch._dynamo.explain(model)(*example_inputs, **example_kwargs)
    report = Report(options=opts.as_dict())
    report.graph_breaks = [str(r.reason) for r in out.break_reasons]
    for i, gm in enumerate(out.graphs):
        report_graph(report, i, gm, opts)
    torch._dynamo.reset()
    return report
