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


def graph_recorder() -> tuple:
    """(backend, graphs): a torch.compile backend that runs Dynamo's graphs as they are, appending each to
    `graphs` (one per compile, recompiles included)."""
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


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


def tiny_condition_unet():
    """A small random `UNet2DConditionModel` (8x8 latents, 2 channels, cross-attention width 8), in eval mode."""
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def watch_solves(monkeypatch, make_mode, seen: list) -> None:
    """Run every `solver.run_forward` / `run_backward` call under a fresh dispatch mode `make_mode()`, appending
    the mode to `seen` after the call (monkeypatched: undone with the test)."""
    from pcr_compile import solver

    for name in ("run_forward", "run_backward"):
        real = getattr(solver, name)

        def watched(*a, _real=real, **k):
            with make_mode() as m:
                out = _real(*a, **k)
            seen.append(m)
            return out

        monkeypatch.setattr(solver, name, watched)
