"""Models that hold their layers' parameters stacked (`W = nn.Parameter(torch.randn(L, w, w))`, read as
`W[i]`, `W.select(0, i)` or `W.unbind(0)[i]`): chains of kind "layers" whose per-step input is the stacked
tensor itself (no copy, one (L, ...) gradient; never the whole W gathered and scattered per step)."""

import pytest
import torch
import torch.nn as nn
from helpers import PARALLEL, capture_graphs, watch_solves

import pcr_compile


def _loop(x, W, b, form):
    L = W.shape[0]
    if form == "unbind":
        Ws, bs = W.unbind(0), b.unbind(0)
        for i in range(L):
            x = torch.tanh(x @ Ws[i].T + bs[i])
    elif form == "select":
        for i in range(L):
            x = torch.tanh(x @ W.select(0, i).T + torch.select(b, 0, i))
    else:
        for i in range(L):
            x = torch.tanh(x @ W[i].T + b[i])
    return x


class Stacked(nn.Module):
    def __init__(self, L=12, w=5, form="getitem"):
        super().__init__()
        self.form = form
        self.W = nn.Parameter(torch.randn(L, w, w) * 0.9 / w ** 0.5)
        self.b = nn.Parameter(torch.randn(L, w) * 0.1)

    def forward(self, x):
        return _loop(x, self.W, self.b, self.form)


@pytest.mark.parametrize("form", ["getitem", "select", "unbind"])
def test_stacked_parameters_are_one_per_step_input_of_kind_layers(form):
    model, x = Stacked(form=form), torch.randn(3, 5)
    [c] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert (c.kind, c.length, c.per_step_inputs, c.lifted_constants, c.invariant_inputs) == ("layers", 12, 2, 0, 0)
    y0 = model(x)
    g0 = torch.autograd.grad(y0.pow(2).sum(), [model.W, model.b])
    with pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        g = torch.autograd.grad(y.pow(2).sum(), [model.W, model.b])
    assert [s.direction for s in solves] == ["forward", "backward"]
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for a, e in zip(g, g0):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_the_stacked_tensor_is_passed_as_it_is():
    """The op reads the parameters' own (L, w, w) and (L, w) tensors: no per-step reads, no stack, no
    gather/scatter of W per step (which cost O(L^2) memory in the backward)."""
    g = capture_graphs(Stacked(L=10, form="getitem"), (torch.randn(2, 5),))
    [call] = [n for n in g["dynamo"].graph.nodes if "pcr_compile.chain_" in str(n.target)]
    stacked = call.args[1]
    assert [n.op for n in stacked] == ["placeholder", "placeholder"]
    vals = [n.meta["example_value"].shape for n in stacked]
    assert vals == [torch.Size([10, 5, 5]), torch.Size([10, 5])]
    assert not any(n.target is torch.stack for n in g["dynamo"].graph.nodes)
    backward_ops = {str(n.target) for n in g["backward"].graph.nodes if n.op == "call_function"}
    assert not any("index_put" in t or "scatter" in t or "select_backward" in t for t in backward_ops), backward_ops


def test_a_slice_of_a_longer_stack_and_float64_gradcheck():
    W = torch.randn(14, 3, 3, dtype=torch.float64) * 0.5
    b = torch.randn(14, 3, dtype=torch.float64) * 0.1

    def f(x, W, b):  # steps 2..11 of the stack: the op reads W[2:12], a view
        for i in range(2, 12):
            x = torch.tanh(x @ W[i].T + b[i])
        return x

    compiled = torch.compile(f, backend="deeppcr", options={**PARALLEL, "min_chain_length": 8})
    x = torch.randn(2, 3, dtype=torch.float64)
    inputs = (x.requires_grad_(), W.requires_grad_(), b.requires_grad_())
    torch.testing.assert_close(compiled(*inputs), f(*inputs))
    assert torch.autograd.gradcheck(compiled, inputs, eps=1e-6, atol=1e-6)


def test_guard_filter_fn_passes_through_torch_compile_options():
    model, x = Stacked(L=9), torch.randn(2, 5)
    opts = {**PARALLEL, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    with pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=opts)(x)
    assert len(solves) == 1
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op returns while active (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_training_step_of_the_stacked_form_allocates_nothing_of_size_L_squared(monkeypatch):
    """Every tensor of the compiled training step, in its graphs and inside the solves, is at most the size of
    what the solve stores (trajectory, dense Jacobians (L, B, w, w), one stacked gradient): gathering or
    scattering the whole W per step would make (L, L, w, w)."""
    L, w, B = 32, 4, 2
    model, x = Stacked(L=L, w=w), torch.randn(B, w)
    modes = []
    watch_solves(monkeypatch, _LargestTensor, modes)
    g = capture_graphs(model, (x,), options={**PARALLEL, "jacobian": "dense"})
    largest = [m.largest for m in modes]
    graph_sizes = [n.meta["val"].numel() for gm in (g["forward"], g["backward"]) for n in gm.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor)]
    bound = 2 * L * B * w * w  # a dense Jacobian, with room for one temporary of its size
    assert len(largest) == 2 and max(largest) <= bound, (largest, bound)
    assert max(graph_sizes) <= bound and max(largest + graph_sizes) < L * L * w * w


def test_stacked_mlp_is_deep_mlp_with_its_parameters_stacked():
    from pcr_compile.models import DeepMLP, StackedMLP

    torch.manual_seed(0)
    ref = DeepMLP(layers=9, width=4)
    torch.manual_seed(0)
    model = StackedMLP(layers=9, width=4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert tuple(model.weight.shape) == (9, 4, 4) and tuple(model.bias.shape) == (9, 4)
    [c] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert (c.kind, c.length, c.per_step_inputs) == ("layers", 9, 2)
