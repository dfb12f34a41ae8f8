"""`pcr_compile.StackedLayers`: identical layers held as one module with stacked parameters, found as a chain
of kind "layers" over the stacked tensors (no per-call stack), with eager's values and gradients."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import PARALLEL, capture_graphs, graph_recorder

import pcr_compile
from pcr_compile import StackedLayers
from pcr_compile.models import PreNormResidualBlock


def _tanh_blocks(L=10, w=6, dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(w, w), nn.Tanh()).to(dtype) for _ in range(L)]


def _residual_blocks(L=9, w=6):
    torch.manual_seed(1)
    return [PreNormResidualBlock(w, scale=0.5) for _ in range(L)]


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("make", [_tanh_blocks, _residual_blocks], ids=["linear-tanh", "prenorm-residual"])
def test_values_gradients_and_chain_kind(make, scan):
    blocks = make()
    ref, st = nn.Sequential(*blocks), StackedLayers(blocks, scan=scan)
    x = torch.randn(4, 6)
    torch.testing.assert_close(st(x), ref(x), rtol=0, atol=0)  # eager: the same ops in the same order
    [c] = pcr_compile.explain(st, x, options=PARALLEL).chains
    assert (c.kind, c.length) == ("layers", len(blocks))
    y0 = ref(x)
    g0 = torch.autograd.grad(y0.pow(2).sum(), list(ref.parameters()))
    with pcr_compile.record_solves() as solves:
        y = torch.compile(st, backend="deeppcr", options=PARALLEL)(x)
        g = torch.autograd.grad(y.pow(2).sum(), list(st.parameters()))
    assert [s.direction for s in solves] == ["forward", "backward"]
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    # each stacked gradient is the layers' gradients stacked, in the layers' parameter order
    n = len(st.parameter_names)
    for k, gk in enumerate(g):
        torch.testing.assert_close(gk, torch.stack(g0[k::n]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_the_stacked_parameters_reach_the_chain_op_without_a_stack(scan):
    st = StackedLayers(_tanh_blocks(L=10), scan=scan)
    g = capture_graphs(st, (torch.randn(2, 6),), options=PARALLEL)
    [call] = [n for n in g["dynamo"].graph.nodes if "pcr_compile.chain_" in str(n.target)]
    assert [n.op for n in call.args[1]] == ["placeholder", "placeholder"]
    assert [n.meta["example_value"].shape for n in call.args[1]] == [torch.Size([10, 6, 6]), torch.Size([10, 6])]
    assert not any("stack" in str(n.target) for n in g["dynamo"].graph.nodes)


def test_float64_gradcheck_through_the_compiled_stack():
    st = StackedLayers(_tanh_blocks(L=8, w=3, dtype=torch.float64))
    compiled = torch.compile(st, backend="deeppcr", options=PARALLEL)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: compiled(x), (x,), eps=1e-6, atol=1e-6)


def test_buffers_are_stacked_and_unstack_round_trips():
    torch.manual_seed(2)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval() for _ in range(3)]
    for b in blocks:
        b[1].running_mean.uniform_(-1, 1)
    st = StackedLayers(blocks)
    assert st.get_buffer("1__running_mean").shape == (3, 4)
    x = torch.randn(5, 4)
    torch.testing.assert_close(st(x), nn.Sequential(*blocks)(x), rtol=0, atol=0)
    back = st.unstack()
    for a, b in zip(back, blocks):
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)
    assert "3 x Sequential" in repr(st)


def test_bad_layers_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        StackedLayers([])
    with pytest.raises(ValueError, match="one class"):
        StackedLayers([nn.Linear(2, 2), nn.Tanh()])
    with pytest.raises(ValueError, match="'weight' of layer 1"):
        StackedLayers([nn.Linear(2, 2), nn.Linear(2, 3)])
    with pytest.raises(ValueError, match="parameters"):
        StackedLayers([nn.Linear(2, 2), nn.Linear(2, 2, bias=False)])
    with pytest.raises(TypeError, match="nn.Module"):
        StackedLayers([nn.Linear(2, 2), lambda x: x])
    with pytest.raises(ValueError, match="training and eval"):
        StackedLayers([nn.Linear(2, 2), nn.Linear(2, 2).eval()])
    with pytest.raises(TypeError, match="scan must be a bool"):
        StackedLayers([nn.Linear(2, 2)], scan="yes")
    # containers that are not sequences of layers: one layer, a number, a tensor (was Python's "'Linear' object is
    # not iterable"), and a ModuleDict, whose iteration gives its keys (was "every layer must be an nn.Module, got
    # ['str']")
    for bad in (nn.Linear(2, 2), 3, torch.randn(2, 2)):
        with pytest.raises(TypeError, match=f"layers must be an nn.ModuleList, .* got {type(bad).__name__}"):
            StackedLayers(bad)
    with pytest.raises(TypeError, match=r"ModuleDict, whose iteration gives its keys.*list\(layers.values\(\)\)"):
        StackedLayers(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}))

    class Loose(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.ones(2)  # neither a parameter nor a buffer

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ValueError, match="scale"):
        StackedLayers([Loose(), Loose()])


def test_extra_arguments_pass_to_every_layer():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, shift, *, gain=1.0):
            return torch.tanh(self.lin(x) + shift) * gain

    torch.manual_seed(3)
    blocks = [Shifted() for _ in range(9)]
    x, shift = torch.randn(2, 3), torch.randn(3)
    ref = x
    for b in blocks:
        ref = b(ref, shift, gain=0.9)
    st = StackedLayers(blocks, scan=True)
    torch.testing.assert_close(st(x, shift, gain=0.9), ref, rtol=0, atol=0)
    with pcr_compile.record_solves() as solves:
        y = torch.compile(st, backend="deeppcr", options=PARALLEL)(x, shift, gain=0.9)
    assert len(solves) == 1
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def _dynamo_graph_nodes(model, x):
    backend, graphs = graph_recorder()
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x)
    [gm] = graphs
    return [n for n in gm.graph.nodes]


def test_dynamo_traces_one_layer_whatever_the_depth():
    """With scan=True the layers are one scan under torch.compile: Dynamo's graph is the same size at 8 and
    40 layers."""
    x = torch.randn(2, 6)
    small, deep = (_dynamo_graph_nodes(StackedLayers(_tanh_blocks(L=L), scan=True), x) for L in (8, 40))
    assert len(small) == len(deep)
    assert sum(n.target is torch.ops.higher_order.scan for n in deep) == 1
    loop = _dynamo_graph_nodes(StackedLayers(_tanh_blocks(L=40)), x)  # the default: the plain loop
    assert len(loop) > 40 and not any(n.target is torch.ops.higher_order.scan for n in loop)


def test_scan_chains_not_rewritten_reach_inductor_unrolled():
    """mode="sequential" rewrites nothing, nor mode="parallel" a scan shorter than min_chain_length: Inductor
    gets the unrolled steps (it fails on this scan itself on torch 2.13), with eager's answer and gradients."""
    blocks = _tanh_blocks(L=8, w=4)
    st, ref = StackedLayers(blocks, scan=True), nn.Sequential(*blocks)
    x = torch.randn(3, 4)
    for options in ({"mode": "sequential"}, {**PARALLEL, "min_chain_length": 9}):
        torch._dynamo.reset()
        with pcr_compile.record_solves() as solves:
            y = torch.compile(st, backend="deeppcr", options=options)(x)
        assert solves == []
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(y.sum(), st.get_parameter("0__weight"))[0]
    g0 = torch.autograd.grad(ref(x).sum(), [b[0].weight for b in blocks])
    torch.testing.assert_close(g, torch.stack(g0), rtol=1e-4, atol=1e-6)


def test_train_and_eval_reach_the_template():
    """`.eval()` / `.train()` on the stack switch the layers' Dropout and BatchNorm (the template that runs
    them is outside the module tree): eager and compiled, including a switch after compiling in train mode."""
    torch.manual_seed(3)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5)) for _ in range(8)]
    for b in blocks:
        b[1].running_mean.uniform_(-1, 1)
    st, ref = StackedLayers(blocks), nn.Sequential(*blocks)
    x = torch.randn(5, 4)
    st.eval(), ref.eval()
    torch.testing.assert_close(st(x), ref(x), rtol=0, atol=0)
    assert not any(m.training for m in st.unstack()[0].modules())
    torch._dynamo.reset()
    compiled = torch.compile(st, backend="deeppcr", options=PARALLEL)
    st.train()
    assert (compiled(x) == 0).any()  # dropout on: compiled in training mode
    st.eval()
    with pcr_compile.record_solves() as solves:
        y = compiled(x)
    assert [s.direction for s in solves] == ["forward"]  # recompiled in eval mode: a chain again
    torch.testing.assert_close(y, st(x), rtol=1e-5, atol=1e-6)  # the running statistics the train call left
    torch.testing.assert_close(st(x), nn.Sequential(*st.unstack())(x), rtol=0, atol=0)
    # layers stacked in eval mode stay in eval mode
    assert not StackedLayers([nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval() for _ in range(2)]).training


@pytest.mark.parametrize("backend", ["eager", "deeppcr"])
def test_scan_with_buffers_in_training_mode_runs_the_loop(backend):
    """A scan's body may not write its inputs (Dynamo refuses it under every backend): layers with buffers in
    training mode (BatchNorm's running statistics) run the loop under scan=True, with eager's outputs and
    statistics; in eval mode they scan."""
    torch.manual_seed(4)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh()) for _ in range(8)]
    st, ref = StackedLayers(copy.deepcopy(blocks), scan=True), nn.Sequential(*blocks)
    x = torch.randn(5, 4)
    torch._dynamo.reset()
    options = {"options": PARALLEL} if backend == "deeppcr" else {}
    compiled = torch.compile(st, backend=backend, **options)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.get_buffer("1__running_var"), torch.stack([b[1].running_var for b in blocks]))
    st.eval(), ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-6)
    assert sum(n.target is torch.ops.higher_order.scan for n in _dynamo_graph_nodes(st, x)) == 1


def test_hooked_or_tied_layers_are_refused_not_silently_changed():
    """One template runs every layer on its own copies of the values: layers with hooks (per-layer hooks never
    ran; layer 0's ran for every layer: 0.7 off the layers' own output) or tensors tied between layers (stacked as
    separate rows: no longer one gradient, one update) are clear errors naming the layer."""
    x = torch.randn(2, 3)
    hooked = [nn.Linear(3, 3) for _ in range(4)]
    for i, layer in enumerate(hooked):
        layer.register_forward_hook(lambda mod, inp, out, i=i: out * (1 + i))
    with pytest.raises(ValueError, match="layer 0 has forward hooks"):
        StackedLayers(hooked)
    inner = [nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(3)]
    inner[2][1].register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    with pytest.raises(ValueError, match="layer 2 has forward pre hooks .*'1'"):
        StackedLayers(inner)
    tied = [nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(3)]
    tied[2][0].weight = tied[0][0].weight
    with pytest.raises(ValueError, match="layer 2's '0.weight' is layer 0's '0.weight'"):
        StackedLayers(tied)
    plain = [nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(3)]
    torch.testing.assert_close(StackedLayers(plain)(x), nn.Sequential(*plain)(x))


def test_unstack_keeps_the_dtype_the_stack_was_moved_to():
    """`.double()` on the stack makes its stacked tensors float64; the layers unstacked must be float64 too (they
    were rebuilt in the dtype the layers had when stacked, the values rounded to float32 in the copy)."""
    blocks = _tanh_blocks(L=4, w=3)
    st = StackedLayers(blocks).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    back = st.unstack()
    assert {p.dtype for layer in back for p in layer.parameters()} == {torch.float64}
    torch.testing.assert_close(nn.Sequential(*back)(x), st(x), rtol=0, atol=0)
    frozen = StackedLayers([nn.Linear(3, 3) for _ in range(2)])
    frozen.get_parameter("weight").requires_grad_(False)
    assert [p.requires_grad for p in frozen.unstack()[1].parameters()] == [False, True]


@pytest.mark.parametrize("backend", ["eager", "deeppcr"])
def test_scan_with_a_float_argument_that_changes_between_calls(backend):
    """A Python float among the extra arguments, changed between calls: Dynamo recompiles with it unspecialised,
    read with `.item()` inside the scan's body, and raised UncapturedHigherOrderOpError under every backend; such
    calls run the loop, with eager's values and gradients."""
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, *, shift=0.0):
            return torch.tanh(self.lin(x) + shift)

    torch.manual_seed(5)
    st = StackedLayers([Shifted() for _ in range(9)], scan=True)
    torch._dynamo.reset()
    options = {"options": PARALLEL} if backend == "deeppcr" else {}
    compiled = torch.compile(st, backend=backend, **options)
    x = torch.randn(2, 3)
    for shift in (0.1, 0.2, 0.3):
        y = compiled(x, shift=shift)
        g = torch.autograd.grad(y.pow(2).sum(), list(st.parameters()))
        y0 = st(x, shift=shift)
        g0 = torch.autograd.grad(y0.pow(2).sum(), list(st.parameters()))
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
