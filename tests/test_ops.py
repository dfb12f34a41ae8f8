"""pcr_compile/runtime/ops.py: the chain ops' arguments, defined once, and what a call costs as the chain grows.

Per-step inputs enter the op stacked (one `(L, ...)` tensor per group) and their gradients leave stacked,
so nothing about a call grows with L but the data: the op's argument list, and the copies in a compiled
training step (graph nodes and the ops the solve runs), are the same at 10 and at 40 layers. (On the
Triton path, the CUDA one: the PyTorch PCR's levels add O(log L) ops.)
"""

import collections

import pytest
import torch
from helpers import watch_solves
from torch.utils._python_dispatch import TorchDispatchMode

import pcr_compile
from pcr_compile.backend import capturing_backend
from pcr_compile.models import DeepMLP
from pcr_compile.options import Options
from pcr_compile.runtime import ops

COPIES = ("clone", "copy_", "copy", "_to_copy")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_schemas_are_built_from_one_argument_list():
    assert ops.CHAIN_SCHEMA.startswith("(Tensor[] states, Tensor[] stacked,")
    assert [n for n, _ in ops.CHAIN_ARGS] == list(ops.ChainArgs._fields)
    assert [n for n, _ in ops.ADJOINT_ARGS] == list(ops.AdjointArgs._fields)
    assert len(ops.chain_call_args(**{n: i for i, n in enumerate(ops.ChainArgs._fields)})) == len(ops.CHAIN_ARGS)
    with pytest.raises(TypeError):
        ops.chain_call_args(states=[])  # every argument is named: none can be forgotten


def _training_step_counts(L: int, monkeypatch) -> tuple[collections.Counter, dict, list]:
    """Copy ops of one compiled training step: nodes of the AOTAutograd forward and backward graphs
    (each runs once per call), and the ops the chain op's solves run (counted with a dispatch mode)."""
    torch.manual_seed(0)
    model = DeepMLP(layers=L, width=4)
    x = torch.randn(2, 4)
    graphs: list[dict] = []
    backend = capturing_backend(Options.parse({"mode": "parallel", "strict": True, "kernels": "triton"}), graphs)
    compiled = torch.compile(model, backend=backend)
    compiled(x).pow(2).mean().backward()  # compile

    modes = []
    watch_solves(monkeypatch, _CountOps, modes)
    model.zero_grad(set_to_none=True)
    compiled(x).pow(2).mean().backward()
    monkeypatch.undo()
    solve_ops = sum((m.counts for m in modes), collections.Counter())
    [g] = graphs
    graph_ops = collections.Counter()
    for kind in ("forward", "backward"):
        for n in g[kind].graph.nodes:
            if n.op == "call_function":
                graph_ops[str(n.target).split(".")[1] if "aten" in str(n.target) else str(n.target)] += 1
    chain_args = [n for n in g["forward"].graph.nodes if "pcr_compile.chain_" in str(n.target)]
    return solve_ops, graph_ops, chain_args


def test_a_training_step_makes_no_per_step_copies(monkeypatch):
    small = _training_step_counts(8, monkeypatch)  # the Triton path under the interpreter: its time grows with L
    large = _training_step_counts(24, monkeypatch)
    for counts_s, counts_l in ((small[0], large[0]), (small[1], large[1])):
        copies_s = {k: counts_s[k] for k in COPIES}
        copies_l = {k: counts_l[k] for k in COPIES}
        assert copies_s == copies_l, (copies_s, copies_l)
    assert large[0]["stack"] == small[0]["stack"] <= 2  # the solve no longer restacks the parameters per call
    # The op's arguments: the same number of tensors at 8 and 24 layers (2 stacked groups, not 2 L tensors).
    [op_s], [op_l] = small[2], large[2]
    sizes = [len(a) if isinstance(a, (list, tuple)) else 1 for a in op_s.args]
    assert sizes == [len(a) if isinstance(a, (list, tuple)) else 1 for a in op_l.args]
    assert sizes[1] == 2


def test_per_step_groups_are_stacked_by_one_opaque_op_with_view_gradients():
    """The rewritten graph stacks all of a chain's ModuleList groups with one `pcr_compile::stack_groups` call
    (one aten.stack per group at run time; a plain torch.stack makes Inductor write and compile one copy kernel
    per layer, and one op call per group pays one dispatch per group), and its gradient is the rows of the
    stacked gradients."""
    from helpers import capture_graphs

    g = capture_graphs(DeepMLP(layers=9, width=3), (torch.randn(2, 3),))
    dynamo_targets = [n.target for n in g["dynamo"].graph.nodes if n.op == "call_function"]
    assert dynamo_targets.count(ops.STACK_GROUPS_OP) == 1, dynamo_targets
    assert torch.stack not in dynamo_targets
    xs = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    ys = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    a, b = ops.stack_groups(xs + ys, [4, 3])
    assert torch.equal(a, torch.stack(xs)) and torch.equal(b, torch.stack(ys))
    assert torch.autograd.gradcheck(lambda *t: ops.stack_groups(list(t), [4, 3]), xs + ys)
    # A group whose stack is unused gets no gradient or zeros, the other its rows.
    a, b = ops.stack_groups(xs + ys, [4, 3])
    a.sum().backward()
    assert all(y.grad is None or not y.grad.any() for y in ys), [y.grad for y in ys]
    assert all(torch.equal(x.grad, torch.ones(3, 2, dtype=x.dtype)) for x in xs), [x.grad for x in xs]
    with pytest.raises(ValueError, match="sizes"):
        ops.stack_groups(xs, [2, 3])
    # A group of tensors that need no gradient (buffers) stays non-differentiable beside one that does.
    frozen = [torch.randn(2, dtype=torch.float64) for _ in range(3)]
    a, b = ops.stack_groups(xs + frozen, [4, 3])
    assert a.requires_grad and not b.requires_grad


class _ChannelsLastSkips(torch.nn.Module):
    """Per-step inputs in channels-last layout (as a UNet's skips come out of Inductor's convolutions): their
    stack has torch.stack's strides, which the stack op's fake kernel must promise for Inductor's check."""

    def __init__(self, layers=8, channels=4):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers))
        self.side = torch.nn.ModuleList(torch.nn.Conv2d(channels, channels, 1) for _ in range(layers))

    def forward(self, x, u):
        skips = [side(u).contiguous(memory_format=torch.channels_last) for side in self.side]
        for conv, s in zip(self.convs, skips):
            x = torch.tanh(conv(x) + s)
        return x


def test_stack_of_channels_last_groups_keeps_its_strides():
    torch.manual_seed(0)
    model = _ChannelsLastSkips()
    x, u = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options={"mode": "parallel", "strict": True})(x, u)
    assert [(s.direction, s.length) for s in solves] == [("forward", 8)] and not solves[0].fell_back
    torch.testing.assert_close(y, model(x, u), rtol=1e-5, atol=1e-6)


def test_channels_last_parameters_stack_in_their_own_layout():
    """Conv weights in channels_last stack channels_last (torch.stack keeps the inputs' layout); the fake kernel
    promised a contiguous stack, so Inductor's stride check on the real output failed at the first call of a
    channels_last conv stack with anything around the chain."""
    from helpers import PARALLEL

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + 0.5 * torch.tanh(self.conv(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*[Block() for _ in range(8)])

        def forward(self, x):
            return self.blocks(x * 2).mean((2, 3))  # ops around the chain: Inductor compiles the graph

    torch.manual_seed(0)
    model = Net().double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = [b.conv.weight for b in model.blocks]
    (stacked,) = ops.stack_groups(w, [len(w)])
    assert stacked.stride() == torch.stack(w).stride()
    with torch._subclasses.FakeTensorMode() as mode:
        (fake,) = ops.stack_groups([mode.from_tensor(t) for t in w], [len(w)])
    assert fake.stride() == stacked.stride()
    y0 = model(x)
    g0 = torch.autograd.grad(y0.square().sum(), w)
    y1 = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    g1 = torch.autograd.grad(y1.square().sum(), w)
    torch.testing.assert_close(y1, y0, rtol=1e-8, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
