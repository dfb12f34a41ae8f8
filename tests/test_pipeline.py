"""passes/pipeline.py and passes/fx_utils.py: the declared pass list, its one signature, and the shared FX helpers."""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn as nn
from helpers import dynamo_graph, graph_fingerprint, graph_recorder

from pcr_compile.backend import prepared
from pcr_compile.models import DeepMLP
from pcr_compile.options import Options
from pcr_compile.passes.chains import find_chains
from pcr_compile.passes.fx_utils import arg_leaves, bound_arguments, cleanup, mutates_in_place, node_value
from pcr_compile.passes.pipeline import PREPARE, GraphPass, PassContext, run_passes


class InPlaceStack(nn.Module):
    """Every layer's activation runs in place on a tensor it made itself: private, rewritten out of place."""

    def __init__(self, n=10, w=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(n))

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu_(lin(x))
        return x


def test_the_pipeline_is_declared_in_order_with_one_signature():
    assert [p.name for p in PREPARE] == ["unroll_scans", "detach_no_grad_regions", "rewrite_fills",
                                       "unit_slices_as_indices",
                                       "hoist_random_draws", "defer_running_stat_updates", "functionalize_inplace",
                                       "defer_slice_writes", "tensor_scalars", "carry_lagged_values",
                                       "defer_integer_states"]
    assert all(isinstance(p, GraphPass) and callable(p.run) for p in PREPARE)


def test_run_passes_logs_what_each_changed_and_leaves_the_analysis_that_still_holds(caplog):
    gm = dynamo_graph(InPlaceStack(), torch.randn(2, 4))
    assert find_chains(gm.graph, min_length=8).chains == ()  # declined: in-place ops
    ctx = PassContext(min_length=8)
    with caplog.at_level(logging.DEBUG, logger="pcr_compile.passes.pipeline"):
        changed = run_passes(gm, PREPARE, ctx)
    assert changed == 10
    assert "functionalize_inplace: 10 changes" in caplog.text and "carry_lagged_values" not in caplog.text
    assert ctx.analysis is not None and [c.length for c in ctx.analysis.chains] == [10]  # made after the rewrite
    assert not any(mutates_in_place(n) for n in gm.graph.nodes)


def test_a_graph_no_pass_changes_is_analysed_in_place_and_left_as_it_was():
    gm = dynamo_graph(DeepMLP(layers=10, width=4), torch.randn(2, 4))
    before = graph_fingerprint(gm.graph)
    same, plan = prepared(gm, Options.parse({"mode": "parallel"}), copy=False)
    assert same is gm and graph_fingerprint(gm.graph) == before
    assert [pc.match.length for pc in plan.chains] == [10]
    calls = []
    run_passes(gm, (GraphPass("noop", lambda g, ctx: calls.append(g) or 0),), PassContext(min_length=8))
    assert calls == [gm] and graph_fingerprint(gm.graph) == before


def test_fx_utils_read_values_leaves_and_bound_arguments():
    gm = dynamo_graph(DeepMLP(layers=2, width=4), torch.randn(2, 4))
    lin = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)
    assert isinstance(node_value(lin), torch.Tensor) and tuple(node_value(lin).shape) == (2, 4)
    assert all(isinstance(x, torch.fx.Node) for x in arg_leaves(lin))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    relu = g.call_function(torch.nn.functional.relu, (x, True))
    bound = bound_arguments(relu)
    assert bound.arguments == {"input": x, "inplace": True}  # bound to the signature's names
    assert bound_arguments(g.call_function(torch.nn.functional.layer_norm, (x, (4,)))).arguments["eps"] == 1e-5
    assert bound_arguments(g.call_function(torch.nn.functional.gelu, (x,))) is None  # a builtin: no signature
    assert bound_arguments(x) is None  # a placeholder calls nothing


def test_mutates_in_place_catches_every_spelling():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    spellings = [g.call_function(operator.iadd, (x, x)), g.call_function(torch.relu_, (x,)),
                 g.call_method("mul_", (x, 2.0)), g.call_function(torch.nn.functional.relu, (x,), {"inplace": True}),
                 g.call_function(torch.tanh, (x,), {"out": x})]
    pure = [g.call_function(torch.relu, (x,)), g.call_method("mul", (x, 2.0)), g.call_method("__add__", (x, x))]
    assert all(mutates_in_place(n) for n in spellings)
    assert not any(mutates_in_place(n) for n in pure)


def test_cleanup_removes_dead_code_but_keeps_in_place_statements():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.call_function(torch.sin, (x,))  # dead
    g.call_method("mul_", (x, 2.0))  # unused result, but it writes x
    g.output(g.call_function(torch.cos, (x,)))
    gm = cleanup(torch.fx.GraphModule(nn.Module(), g))
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets == ["mul_", torch.cos]
    t = torch.ones(3)
    assert torch.equal(gm(t), torch.cos(torch.full((3,), 2.0)))


class _FloatUses(nn.Module):
    """A float attribute used as a tensor operand, in float arithmetic, with a 0-d tensor, and as `alpha=`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = 0.5, 0.25

    def forward(self, x):
        s = x.sum()  # 0-d: `s * a` would promote to float64 with a 0-d float64 operand; it keeps its float
        return (1 - self.a) * x + x.mul(self.a), s * self.b, torch.add(x, x, alpha=self.b)


def _recompiled_graph(model, x):
    """Dynamo's graph after the model's floats changed (recompiled with them as 0-d tensors read by .item())."""
    backend, graphs = graph_recorder()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    model.a, model.b = model.a + 0.1, model.b + 0.1
    compiled(x)
    return graphs[-1]


def test_tensor_scalars_keeps_floats_tensors_only_where_every_use_takes_a_tensor():
    from pcr_compile.passes.scalars import tensor_scalars

    model, x = _FloatUses(), torch.randn(3, 4)
    gm = _recompiled_graph(model, x)
    items = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert len(items) == 2
    expected = model(x)
    assert tensor_scalars(gm.graph) == 1  # `a`; `b` keeps its .item() (a 0-d operand, and alpha=)
    gm.recompile()
    left = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert len(left) == 1
    for got, want in zip(gm(*[torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v
                              for v in _inputs_of(gm, model, x)]), expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _inputs_of(gm, model, x):
    """The recompiled graph's inputs for `model(x)`, by placeholder name (x, then the floats a and b)."""
    values = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            values.append(x if n.name.endswith("x_") or "args_0" in n.name else
                          model.a if n.name.endswith("_a") else model.b)
    return values
