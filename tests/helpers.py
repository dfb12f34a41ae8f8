"""Helpers shared by the backend tests (imported as `helpers`)."""

from __future__ import annotations

import torch

import pcr_compile
from pcr_compile.backend import capturing_backend
from pcr_compile.options import Options

PARALLEL = {"mode": "parallel", "strict": True}


def run_both(model, inputs, options=None, loss=lambda y: y.float().pow(2).mean()):
    """Eager and deeppcr on the same inputs: (y_eager, grads_eager, y_pcr, grads_pcr, solves)."""
    params = [p for p in model.parameters() if p.requires_grad]
    y0 = model(*inputs)
    g0 = torch.autograd.grad(loss(y0), params)
    compiled = torch.compile(model, backend="deeppcr", options=options or PARALLEL)
    with pcr_compile.record_solves() as solves:
        y1 = compiled(*inputs)
        g1 = torch.autograd.grad(loss(y1), params)
    return y0, g0, y1, g1, solves


def capture_graphs(model, inputs, options=None):
    """Compile with a backend that rewrites like deeppcr and records the Dynamo graph after the rewrite and
    the AOTAutograd forward and backward graphs; runs forward and backward once."""
    graphs: list[dict] = []
    backend = capturing_backend(Options.parse(options or PARALLEL), graphs)
    y = torch.compile(model, backend=backend)(*inputs)
    y.float().sum().backward()
    [seen] = graphs
    return seen


def call_targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def dynamo_graph(model, *inputs):
    """The one FX graph Dynamo captures of `model(*inputs)` (asserts there is no graph break)."""
    out = torch._dynamo.explain(model)(*inputs)
    assert out.graph_count == 1, out.break_reasons
    return out.graphs[0]


def graph_fingerprint(graph: torch.fx.Graph) -> list[tuple]:
    """Everything a pass could change in a graph, node by node: name, op, target, arguments, users and the
    meta keys (``gm.code`` is refreshed only by ``recompile()``, so comparing it misses a mutation)."""
    return [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs), tuple(u.name for u in n.users),
             tuple(sorted(n.meta))) for n in graph.nodes]
