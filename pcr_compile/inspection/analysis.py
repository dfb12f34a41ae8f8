"""Stage 2 of `pcr-compile inspect`: Dynamo's view of the model (``torch._dynamo.explain``: graphs, graph breaks
with reasons), the chain finder and cost model on every graph (``pcr_compile.api.report_graph``), and
``backend.rewrite`` on every graph: the FX graph before and after the rewrite. Compiles nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..api import dynamo_explain, report_graph
from ..options import Options
from ..reports import Report, skip_summary
from .targets import Target

CHAIN_MARK = ">> "
CHAIN_OP_TEXT = "torch.ops.pcr_compile.chain_"


@dataclass
class GraphRewrite:
    graph: int
    rewritten: bool
    chain_ops: list[str]
    error: str | None
    before: str
    after: str | None


@dataclass
class Inspection:
    target: Target
    options: Options
    report: Report
    break_locations: list[str]
    rewrites: list[GraphRewrite]
    aot: list[dict] | None = None
    run: dict | None = None
    sections: set = field(default_factory=set)  # {"graphs"}: show the before/after texts


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False).rstrip() + "\n"


def mark_chain_ops(text: str) -> str:
    """Prefix the lines that call a chain op (forward or adjoint) with `>> `, every other line with 3 spaces."""
    return "".join((CHAIN_MARK if CHAIN_OP_TEXT in line else "   ") + line for line in text.splitlines(True))


def chain_ops_in(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("pcr_compile.chain_")]


def analyse(target: Target, options: Options) -> Inspection:
    """Dynamo's view of the model, the chains in every graph and the rewrite the options give; compiles nothing."""
    from ..backend import rewrite

    torch._dynamo.reset()
    out, skipped = dynamo_explain(target.model, target.inputs, target.kwargs)
    report = Report(options=options.as_dict(), skipped_frames=skipped)
    report.graph_breaks = [str(r.reason) for r in out.break_reasons]
    locations = []
    for r in out.break_reasons:
        f = r.user_stack[-1] if r.user_stack else None
        locations.append(f"{f.filename}:{f.lineno} in {f.name}" if f is not None else "")
    rewrites = []
    for i, gm in enumerate(out.graphs):
        report_graph(report, i, gm, options)
        try:
            new, _, names = rewrite(gm, options)
            rewrites.append(GraphRewrite(i, bool(names), names, None, _readable(gm), _readable(new)))
        except Exception as e:  # the backend would log this and compile the original graph with Inductor
            rewrites.append(GraphRewrite(i, False, [], f"{type(e).__name__}: {e}", _readable(gm), None))
    torch._dynamo.reset()
    return Inspection(target, options, report, locations, rewrites)


def nothing_rewritten_note(ins: Inspection) -> str | None:
    """Why no graph was rewritten, or None when one was."""
    if any(r.rewritten for r in ins.rewrites):
        return None
    errors = [r for r in ins.rewrites if r.error]
    if errors:
        return (f"nothing rewritten: the rewrite of graph {errors[0].graph} failed ({errors[0].error}); the backend "
                "compiles the original graph with Inductor")
    if not ins.rewrites and ins.report.skipped_frames:
        return (f"nothing rewritten: Dynamo captured no graph and ran the call eagerly "
                f"({skip_summary(ins.report.skipped_frames[0])}); the backend never sees this model's code, so "
                "torch.compile(model, backend='deeppcr') runs it as eager PyTorch")
    tail = "the graph after the rewrite is the graph before; Inductor compiles it as torch.compile(model) would"
    if not ins.report.chains:
        return f"nothing rewritten: no chains found; {tail}"
    mode = ins.options.mode
    if mode == "sequential":
        return f"nothing rewritten: mode='sequential' finds chains and rewrites none; {tail}"
    devices = {str(t.device.type) for t in (*ins.target.inputs, *ins.target.kwargs.values())
               if isinstance(t, torch.Tensor)}
    if mode == "auto" and "cuda" not in devices:
        return (f"nothing rewritten: mode='auto' keeps chains sequential on {'/'.join(sorted(devices)) or 'cpu'} "
                "(the parallel solve is a GPU effect); pass --options '{\"mode\": \"parallel\"}' to force it; "
                + tail)
    return f"nothing rewritten: no chain was decided 'parallel' (see the reasons above); {tail}"

