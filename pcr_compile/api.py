"""`pcr_compile.explain`: what the backend finds in a model and what it would do, without compiling.

The report mirrors `torch._dynamo.explain` (graphs, graph breaks, ops per graph) and adds, per graph,
the chains found (with their decision, Jacobian strategy and reason) and the candidates declined.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from .backend import chain_spec, prepared
from .options import Options
from .reports import ChainReport, DeclinedReport, GraphSummary, Report, chain_report, op_counts

__all__ = ["explain", "dynamo_explain", "report_graph", "Report", "ChainReport", "DeclinedReport", "GraphSummary"]


def _with_run_time_switch(report: ChainReport, planned, options: Options) -> ChainReport:
    """mode="auto" switches a chain whose solve did not pay to sequential at run time (solver/auto_switch.py):
    say so in the chain's reason when that chain's op has been switched in this process."""
    if options.mode != "auto" or planned.decision.decision != "parallel":
        return report
    from .solver import switched

    why = switched(chain_spec(planned.match).name)
    if not why:
        return report
    return replace(report, reason=f"{report.reason}; switched to sequential at run time: {why[0]}")


def report_graph(report: Report, index: int, gm: torch.fx.GraphModule, options: Options):
    """Add one graph's analysis to `report`; returns the plan."""
    _, plan = prepared(gm, options, copy=False)  # read only
    report.graphs.append(GraphSummary(index=index, nodes=len(gm.graph.nodes), ops=op_counts(gm)))
    report.chains.extend(_with_run_time_switch(chain_report(index, pc), pc, options) for pc in plan.chains)
    report.declined.extend(DeclinedReport(graph=index, **asdict(d)) for d in plan.declined)
    return plan


def dynamo_explain(model, args: tuple, kwargs: dict):
    """`torch._dynamo.explain(model)(*args, **kwargs)` and the messages of the frames Dynamo skipped meanwhile.

    A skipped frame runs eagerly and leaves no graph and no break reason in the explain output (torch 2.13: a
    graph break inside a `for` loop skips the whole frame, "graph breaks in loops are not supported"); its
    message is in Dynamo's `unimplemented` counter. Returned are the messages this call added there that say
    a frame was skipped, and, when no graph was captured at all, every message it added (none that another
    one contains: a chained message repeats the break it started from)."""
    from torch._dynamo.utils import counters

    before = dict(counters["unimplemented"])
    out = torch._dynamo.explain(model)(*args, **kwargs)
    added = [m for m, n in counters["unimplemented"].items() if n > before.get(m, 0)]
    breaks = {str(r.reason) for r in out.break_reasons}
    skipped = [m for m in added if m not in breaks
               and (not out.graphs or "Skipping the frame" in m or "frame skipped" in m)]
    return out, [m for m in skipped if not any(m != other and m in other for other in skipped)]


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
    if not callable(model):
        raise TypeError(f"explain: model must be callable (an nn.Module or a function), got {type(model).__name__}")
    opts = Options.parse(options)
    out, skipped = dynamo_explain(model, example_inputs, example_kwargs)
    report = Report(options=opts.as_dict(), skipped_frames=skipped)
    report.graph_breaks = [str(r.reason) for r in out.break_reasons]
    for i, gm in enumerate(out.graphs):
        report_graph(report, i, gm, opts)
    torch._dynamo.reset()
    return report
