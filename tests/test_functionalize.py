"""In-place ops in blocks: private mutations are rewritten out of place (and the chain solved), the others
are left alone (and their blocks declined), and every compiled answer is eager's."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

import pcr_compile
from pcr_compile.passes.chains import find_chains
from pcr_compile.passes.functionalize import functionalize_inplace


def dynamo_graph(model, *inputs):
    out = torch._dynamo.explain(model)(*inputs)
    assert out.graph_count == 1, out.break_reasons
    return out.graphs[0]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: `nn.ReLU(inplace=True)` and `out += identity`."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        nn.init.constant_(self.bn2.weight, 0.1)  # a small residual branch, as zero-init-residual starts

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TorchvisionStyleResNet(nn.Module):
    def __init__(self, blocks=9, c=6):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 4)
        for m in self.modules():  # non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.layer(torch.relu(self.stem(x))).mean((2, 3)))


def test_functionalize_rewrites_private_mutations_only():
    gm = dynamo_graph(TorchvisionStyleResNet(blocks=3).eval(), torch.randn(1, 3, 5, 5))
    targets = [str(n.target) for n in gm.graph.nodes]
    assert sum("iadd" in t for t in targets) == 3
    assert find_chains(gm.graph, min_length=3).chains == ()  # declined as it stands
    n = functionalize_inplace(gm.graph)
    assert n == 3 * 3  # per block: two ReLUs and the +=
    assert not any(n.kwargs.get("inplace") for n in gm.graph.nodes)
    assert not any("iadd" in str(n.target) for n in gm.graph.nodes)
    gm.recompile()
    [c] = find_chains(gm.graph, min_length=3).chains
    assert c.length == 3


def test_torchvision_style_resnet_is_one_chain_with_eager_values_and_grads():
    """Eval mode with gradients (fine-tuning with frozen BatchNorm statistics): the running statistics are
    per-step inputs that are floating but take no gradient."""
    model = TorchvisionStyleResNet(blocks=9).eval()
    x = torch.randn(2, 3, 6, 6)
    [chain] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert chain.length == 9 and chain.decision == "parallel"
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [s.direction for s in solves] == ["forward", "backward"]
    assert not any(s.fell_back for s in solves)


class LinearStack(nn.Module):
    """`layers` Linear(width, width) modules; subclasses differ only in `forward`."""

    def __init__(self, layers=9, width=4):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))


class MutatesInput(LinearStack):
    """Each block mutates its input in place; for the first block that is the caller's tensor."""

    def forward(self, x):
        for lin in self.lins:
            x.mul_(0.9)
            x = torch.tanh(lin(x))
        return x


class ReadsAView(LinearStack):
    """A view of the tensor taken before the in-place op sees the mutation: not private."""

    def forward(self, x):
        for lin in self.lins:
            h = lin(x)
            v = h[:, :2]
            h.relu_()
            x = torch.tanh(h) + torch.cat([v, v], 1)
        return x


class PositionalInplaceFlag(LinearStack):
    """`F.relu(h, True)`: the in-place flag passed by position, with a view of `h` read afterwards. This was
    once taken for a pure op and solved (silently wrong by 0.7)."""

    def __init__(self, layers=9, view=True):
        super().__init__(layers)
        self.view = view

    def forward(self, x):
        for lin in self.lins:
            h = lin(x)
            v = h[:, :2] if self.view else x[:, :2]
            nn.functional.relu(h, True)
            x = torch.tanh(h) + torch.cat([v, v], 1)
        return x


def test_positional_inplace_flag_on_a_private_tensor_is_rewritten():
    torch.manual_seed(0)
    model = PositionalInplaceFlag(view=False)
    x = torch.randn(3, 4)
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert solves[0].length == 9


class PromotesInPlace(LinearStack):
    """`h += b` with a float64 `b` stays float32 in place; `h + b` would be float64: not rewritten."""

    def forward(self, x, b):
        for lin in self.lins:
            h = lin(x)
            h += b
            x = torch.tanh(h)
        return x


def test_mutation_of_the_callers_tensor_stays_and_the_rest_is_a_chain():
    torch.manual_seed(0)
    model = MutatesInput()
    x = torch.randn(3, 4)
    [chain] = pcr_compile.explain(model, x.clone(), options=PARALLEL).chains
    assert chain.length == 8  # blocks 2-9 mutate the previous block's fresh result
    with torch.no_grad():
        x_eager, x_compiled = x.clone(), x.clone()
        ref = model(x_eager)
        with pcr_compile.record_solves() as solves:
            out = torch.compile(model, backend="deeppcr", options=PARALLEL)(x_compiled)
    assert rel_err(out, ref) < 1e-6 and len(solves) == 1
    torch.testing.assert_close(x_compiled, x_eager, rtol=0, atol=0)  # the caller sees the same mutation
    assert not torch.equal(x_compiled, x)


@pytest.mark.parametrize("make,inputs,why", [
    (ReadsAView, lambda: [torch.randn(3, 4)], "is a view of, or aliases, the written tensor"),
    (PositionalInplaceFlag, lambda: [torch.randn(3, 4)], "is a view of, or aliases, the written tensor"),
    (PromotesInPlace, lambda: [torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)],
     "reads a tensor of another dtype"),
])
def test_mutations_that_are_not_private_stay_and_decline_the_block(make, inputs, why):
    torch.manual_seed(0)
    model = make()
    args = inputs()
    report = pcr_compile.explain(model, *[a.clone() for a in args], options=PARALLEL)
    assert report.chains == [], report
    assert any("in-place op" in d.reason and "kept in place: " in d.reason and why in d.reason
               for d in report.declined), report.declined
    with torch.no_grad():
        ref = model(*[a.clone() for a in args])
        torch._dynamo.reset()
        out = torch.compile(model, backend="deeppcr", options=PARALLEL)(*[a.clone() for a in args])
    assert out.dtype == ref.dtype and rel_err(out, ref) < 1e-6


class InPlaceResidual(LinearStack):
    """`x = x + f(x)` then `x.mul_(s)`: method-form in-place ops on a block's own result."""

    def __init__(self, layers=10):
        super().__init__(layers, width=6)

    def forward(self, x):
        x = x.clone()
        for lin in self.lins:
            x = x + 0.3 * torch.relu_(lin(x))
            x.mul_(0.9)
        return x


def test_method_and_function_forms_are_rewritten_and_solved():
    torch.manual_seed(0)
    model = InPlaceResidual()
    x = torch.randn(3, 6)
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert len(solves) == 2 and solves[0].length == 10


class ScalesInputThenChain(LinearStack):
    """An in-place statement whose result is unused, outside any chain: dead-code elimination after the
    rewrite once dropped it (FX does not count in-place methods as impure), silently changing the answer."""

    def forward(self, x):
        x.mul_(2.0)
        for lin in self.lins:
            x = torch.tanh(lin(x))
        return x


def test_in_place_statement_outside_the_chain_survives_the_rewrite():
    torch.manual_seed(0)
    model = ScalesInputThenChain()
    x = torch.randn(3, 4)
    with torch.no_grad():
        x_eager, x_compiled = x.clone(), x.clone()
        ref = model(x_eager)
        with pcr_compile.record_solves() as solves:
            out = torch.compile(model, backend="deeppcr", options=PARALLEL)(x_compiled)
    assert len(solves) == 1 and solves[0].length == 9
    assert rel_err(out, ref) < 1e-6
    torch.testing.assert_close(x_compiled, 2.0 * x, rtol=0, atol=0)


class FunctionalBatchNorm(LinearStack):
    """`F.batch_norm(..., training=True)` writes its running statistics: a mutation without an underscore."""

    def __init__(self, training, layers=9):
        super().__init__(layers)
        self.training_stats = training
        for i in range(layers):
            self.register_buffer(f"mean{i}", torch.zeros(4))
            self.register_buffer(f"var{i}", torch.ones(4))

    def forward(self, x):
        for i, lin in enumerate(self.lins):
            h = nn.functional.batch_norm(lin(x), getattr(self, f"mean{i}"), getattr(self, f"var{i}"),
                                         training=self.training_stats)
            x = torch.tanh(h)
        return x


class FunctionalBatchNormReadsStats(FunctionalBatchNorm):
    def forward(self, x):
        return super().forward(x) * self.mean3.sum()


@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_in_training_moves_its_writes_or_declines(training):
    """`F.batch_norm(training=True)` writes its running statistics: the writes move after the chain, or,
    when the graph reads a statistic, stay and decline the block (`mutates_in_place` sees them)."""
    from pcr_compile.passes.fx_utils import mutates_in_place

    x = torch.randn(3, 4)
    report = pcr_compile.explain(FunctionalBatchNorm(training), x, options=PARALLEL)
    assert [c.length for c in report.chains] == [9]
    reads = FunctionalBatchNormReadsStats(training)
    if training:
        gm = dynamo_graph(reads, x)
        assert sum(mutates_in_place(n) for n in gm.graph.nodes) == 9
        report = pcr_compile.explain(reads, x, options={**PARALLEL, "min_chain_length": 3})
        assert [c.length for c in report.chains] == [3, 5]  # around block 3, whose write stays
    eager, compiled = FunctionalBatchNormReadsStats(training), FunctionalBatchNormReadsStats(training)
    compiled.load_state_dict(eager.state_dict())
    y0 = eager(x)
    y1 = torch.compile(compiled, backend="deeppcr", options={**PARALLEL, "min_chain_length": 3})(x)
    assert rel_err(y1, y0) < 1e-5
    for (name, b0), b1 in zip(eager.named_buffers(), compiled.buffers()):
        assert rel_err(b1, b0) < 1e-5 and b1.grad_fn is None, name


def test_mutations_found_from_the_call_arguments():
    from pcr_compile.passes.fx_utils import mutates_in_place

    g = torch.fx.Graph()
    a, h = g.placeholder("a"), g.placeholder("h")
    assert mutates_in_place(g.call_function(torch.tanh, (a,), {"out": h}))
    assert not mutates_in_place(g.call_function(torch.tanh, (a,)))
    assert mutates_in_place(g.call_function(nn.functional.relu, (a, True)))
    assert not mutates_in_place(g.call_function(nn.functional.relu, (a, False)))
    assert not mutates_in_place(g.call_function(nn.functional.batch_norm, (a, h, h)))  # training=False
    assert mutates_in_place(g.call_function(nn.functional.batch_norm, (a, h, h), {"training": True}))
    assert not mutates_in_place(g.call_function(nn.functional.batch_norm, (a, None, None, None, None, True)))
    assert mutates_in_place(g.call_function(nn.functional.instance_norm, (a, h, h)))  # use_input_stats=True


def _train_step(model, x, compiled=None):
    """One forward and backward; `compiled`: the deeppcr options to compile with (True: PARALLEL)."""
    options = PARALLEL if compiled is True else compiled
    y = (torch.compile(model, backend="deeppcr", options=options) if compiled else model)(x)
    y.pow(2).mean().backward()
    return y, [p.grad for p in model.parameters()], dict(model.named_buffers())


def test_training_mode_batch_norm_chain_updates_running_statistics_like_eager():
    """BatchNorm in training mode: batch statistics in the chain, running-statistics writes after it."""
    import copy

    eager = TorchvisionStyleResNet(blocks=9).train()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 6, 6)
    [chain] = pcr_compile.explain(copy.deepcopy(eager), x, options=PARALLEL).chains
    assert chain.length == 9
    y0, g0, b0 = _train_step(eager, x)
    with pcr_compile.record_solves() as solves:
        y1, g1, b1 = _train_step(compiled_model, x, compiled=True)
    assert [s.direction for s in solves] == ["forward", "backward"] and not any(s.fell_back for s in solves)
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert b0.keys() == b1.keys()
    for name in b0:
        if name.endswith("num_batches_tracked"):
            assert int(b1[name]) == int(b0[name]) == 1, name
        else:
            assert rel_err(b1[name], b0[name]) < 1e-5 and b1[name].grad_fn is None, name
            assert not torch.equal(b1[name], TorchvisionStyleResNet(blocks=9).get_buffer(name)), name  # written


class ReadsRunningMean(TorchvisionStyleResNet):
    """Reads a running mean after the forward: its write cannot move, so the blocks stay declined."""

    def forward(self, x):
        return super().forward(x) + self.layer[4].bn1.running_mean.sum()


def test_running_statistics_read_in_the_graph_keep_their_writes_in_place():
    """Block 4's first BatchNorm keeps its write in place, the others' move: two chains of 4 around it."""
    import copy

    eager = ReadsRunningMean(blocks=9).train()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 6, 6)
    options = {**PARALLEL, "min_chain_length": 4}
    report = pcr_compile.explain(copy.deepcopy(eager), x, options=options)
    assert [c.length for c in report.chains] == [4, 4]
    y0, g0, b0 = _train_step(eager, x)
    y1, g1, b1 = _train_step(compiled_model, x, compiled=options)
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert all(rel_err(b1[k], b0[k]) < 1e-5 for k in b0)


class BatchNormMLPBlock(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        return x + 0.3 * torch.tanh(self.bn(self.fc(x)))


class StackedBatchNorm(nn.Module):
    def __init__(self, blocks=9, reads_row=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = pcr_compile.StackedLayers([BatchNormMLPBlock() for _ in range(blocks)])
        self.reads_row = reads_row

    def forward(self, x):
        y = self.blocks(x)
        return y + self.blocks.bn__running_mean[4].sum() if self.reads_row else y


@pytest.mark.parametrize("reads_row", [False, True])
def test_stacked_layers_batch_norm_in_training_is_a_chain_with_eager_statistics(reads_row):
    """`StackedLayers` holds the running statistics as rows of one `(L, C)` buffer, each layer writing its row
    `buf[i]`: those writes move after the chain as a plain buffer's do (the stack in training mode was
    declined). A graph that reads a row keeps the writes in place. Two SGD steps and an eval call: eager's
    outputs, parameters and buffers."""
    import copy

    x = torch.randn(5, 6)
    eager = StackedBatchNorm(reads_row=reads_row).train()
    compiled_model = copy.deepcopy(eager)
    report = pcr_compile.explain(copy.deepcopy(eager), x, options=PARALLEL)
    assert [c.length for c in report.chains] == ([] if reads_row else [9])
    compiled = torch.compile(compiled_model, backend="deeppcr", options=PARALLEL)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    with pcr_compile.record_solves() as solves:
        for step in range(2):
            for f, opt in zip((eager, compiled), opts):
                opt.zero_grad()
                f(x + step).pow(2).mean().backward()
                opt.step()
    assert len(solves) == (0 if reads_row else 4) and not any(s.fell_back for s in solves)
    for (name, t0), t1 in zip([*eager.named_parameters(), *eager.named_buffers()],
                              [*compiled_model.parameters(), *compiled_model.buffers()]):
        assert rel_err(t1.double(), t0.double()) < 1e-5 and t1.grad_fn is None, name
    assert compiled_model.blocks.bn__num_batches_tracked.tolist() == [2] * 9
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), eager(x)) < 1e-5


class FilledBuffer(nn.Module):
    """A GRU loop storing each step's state in a preallocated output, `out[:, t] = h` (seq2seq tutorials' form);
    `read_back` also reads the buffer inside the loop (the writes then stay, and the block is declined)."""

    def __init__(self, read_back=False, steps=10):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.head, self.read_back, self.steps = nn.GRUCell(3, 4), nn.Linear(4, 2), read_back, steps

    def forward(self, x, h):
        out = x.new_empty(x.shape[0], self.steps, 4)
        logits = torch.zeros(self.steps, x.shape[0], 2, dtype=x.dtype)
        for t in range(self.steps):
            h = self.cell(x[:, t] + (out[:, t - 1, :3] if self.read_back and t else 0), h)
            out[:, t] = h
            logits[t] = self.head(h)  # not a state: read back from the solved trajectory
        return out, logits.transpose(0, 1).softmax(-1)


@pytest.mark.parametrize("read_back", [False, True])
def test_writes_into_a_preallocated_output_move_out_of_the_steps(read_back):
    model = FilledBuffer(read_back).double()
    x, h = torch.randn(2, 10, 3, dtype=torch.double, requires_grad=True), torch.randn(2, 4, dtype=torch.double)
    report = pcr_compile.explain(model, x, h, options=PARALLEL)
    if read_back:
        assert report.chains == [] and "setitem" in report.declined[0].reason
    else:
        [chain] = report.chains
        assert chain.length == 10 and chain.kind == "recurrence"
    loss = lambda ys: ys[0].pow(2).mean() + ys[1][..., 0].sum()  # noqa: E731
    y0, g0, y1, g1, solves = run_both(model, [x, h], loss=loss)
    assert max(rel_err(a, b) for a, b in zip(y1, y0)) < 1e-9 and grads_rel_err(g1, g0) < 1e-9
    assert [s.direction for s in solves] == ([] if read_back else ["forward", "backward"])


def test_slice_writes_stay_where_a_value_they_store_is_written_in_place_before_the_reader():
    """`out[t] = src; src.add_(1)` on the caller's tensor: moved down, the write would store the bumped value."""
    from pcr_compile.passes.functionalize import defer_slice_writes

    def f(src):
        out = torch.zeros(3, 2)
        for t in range(3):
            out[t] = src
            src.add_(1.0)
        return out * 1.0

    gm = dynamo_graph(f, torch.zeros(2))
    before = [n.name for n in gm.graph.nodes]
    assert defer_slice_writes(gm.graph) == 0 and [n.name for n in gm.graph.nodes] == before
    compiled = torch.compile(f, backend="deeppcr", options=PARALLEL)
    a, b = torch.zeros(2), torch.zeros(2)
    torch.testing.assert_close(compiled(a), f(b))
    torch.testing.assert_close(a, b)


class AccumulatedBuffer(nn.Module):
    """A GRU loop accumulating each step's state into a buffer made before the loop, `acc[:, t] += h` (`form`:
    `"index"`, `C[t] += h` on zeros; `"slice"`, `traj[:, t] += 2 h` on ones beside `out[:, t] = h`; `"input"`,
    `C[t] -= h` on a buffer made from the input; `"overlap"`, `C[t % 2] += h`, two steps on one slice;
    `"read_back"`, the step also reading `C[t - 1]`)."""

    def __init__(self, form, steps=8):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.form, self.steps = nn.GRUCell(3, 4), form, steps

    def forward(self, x, h):
        T, B, form = self.steps, x.shape[0], self.form
        if form == "slice":
            out, traj = x.new_empty(B, T, 4), torch.ones(B, T, 4, dtype=x.dtype)
        elif form == "input":
            C = x[:, :, :1].transpose(0, 1).repeat(1, 1, 4)
        else:
            C = torch.zeros(2 if form == "overlap" else T, B, 4, dtype=x.dtype)
        for t in range(T):
            h = self.cell(x[:, t] + (0.1 * C[t - 1, :, :3] if form == "read_back" else 0), h)
            if form == "slice":
                out[:, t] = h
                traj[:, t] += h * 2
            elif form == "input":
                C[t] -= h
            else:
                C[t % 2 if form == "overlap" else t] += h
        return (out, traj) if form == "slice" else (C, h)


SHORT = {**PARALLEL, "min_chain_length": 4}


@pytest.mark.parametrize("form", ["index", pytest.param("slice", marks=pytest.mark.slow),
                                  pytest.param("input", marks=pytest.mark.slow)])
def test_accumulations_into_a_preallocated_buffer_move_out_of_the_steps(form):
    """`C[t] += h` in a loop was declined ("in-place op iadd ... getitem is a view of ... the written tensor");
    with disjoint slices it is `C[t] = C[t] + h`, the reads served by a copy of the buffer taken before the loop
    (the chain's backward would otherwise find its input modified in place), and the block is a chain."""
    model = AccumulatedBuffer(form, steps=4).double()
    x, h = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True), torch.randn(2, 4, dtype=torch.double)
    [chain] = pcr_compile.explain(model, x, h, options=SHORT).chains
    assert chain.length == 4 and chain.kind == "recurrence"
    loss = lambda ys: ys[0].pow(2).mean() + ys[1][..., 0].sin().sum()  # noqa: E731
    y0, g0, y1, g1, solves = run_both(model, [x, h], options=SHORT, loss=loss)
    assert max(rel_err(a, b) for a, b in zip(y1, y0)) < 1e-9 and grads_rel_err(g1, g0) < 1e-9
    assert [s.direction for s in solves] == ["forward", "backward"]


@pytest.mark.parametrize("form", ["index", "slice", "input", "overlap", "read_back"])
def test_accumulations_move_only_when_each_reads_a_slice_no_earlier_write_touched(form):
    """Two steps on one slice (`C[t % 2] += h`), or a read of the buffer in the loop, keep the writes (and the
    in-place ops) where they are; disjoint accumulations all move, reading a copy made before the loop."""
    import operator

    from pcr_compile.passes.functionalize import defer_slice_writes

    model = AccumulatedBuffer(form, steps=4).double()
    gm = dynamo_graph(model, torch.randn(2, 4, 3, dtype=torch.double), torch.randn(2, 4, dtype=torch.double))
    in_place = sum(n.target is operator.iadd or n.target is operator.isub for n in gm.graph.nodes)
    moved = defer_slice_writes(gm.graph)
    left = sum(n.target is operator.iadd or n.target is operator.isub for n in gm.graph.nodes)
    clones = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "clone"]
    if form in ("overlap", "read_back"):
        assert moved == 0 and left == in_place == 4 and not clones
    else:
        assert moved == (8 if form == "slice" else 4) and left == 0 and len(clones) == 1
        assert all(u.target is operator.getitem for u in clones[0].users) and len(clones[0].users) == 4


@pytest.mark.slow
@pytest.mark.parametrize("form", ["overlap", "read_back"])
def test_accumulations_kept_in_place_are_eagers(form):
    model = AccumulatedBuffer(form, steps=4).double()
    x, h = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True), torch.randn(2, 4, dtype=torch.double)
    report = pcr_compile.explain(model, x, h, options=SHORT)
    assert report.chains == [] and "iadd" in report.declined[0].reason
    loss = lambda ys: ys[0].pow(2).mean() + ys[1][..., 0].sin().sum()  # noqa: E731
    y0, g0, y1, g1, solves = run_both(model, [x, h], options=SHORT, loss=loss)
    assert max(rel_err(a, b) for a, b in zip(y1, y0)) < 1e-12 and grads_rel_err(g1, g0) < 1e-12 and not solves


def test_slice_writes_stay_before_a_read_of_a_view_taken_before_them():
    """`row = out[0]` taken before the loop and read after it reads what the writes stored: the writes were moved
    past that read (only the buffer's own users and views counted as readers), and `row * 2` came out 0."""
    from pcr_compile.passes.functionalize import defer_slice_writes

    def f(x):
        out = torch.zeros(4, *x.shape)
        row, h = out[0], x
        for t in range(4):
            h = torch.tanh(h * 1.5 + 0.1)
            out[t] = h
        return row * 2, h

    x = torch.randn(2, 3)
    gm = dynamo_graph(f, x)
    mul = next(n for n in gm.graph.nodes if n.op == "call_function" and "mul" in str(n.target) and n.args[1] == 2)
    defer_slice_writes(gm.graph)
    nodes = list(gm.graph.nodes)
    assert all(nodes.index(w) < nodes.index(mul) for w in nodes if w.target is __import__("operator").setitem)
    gm.recompile()
    torch.testing.assert_close(gm(x)[0], f(x)[0])


class AssignCoupling(nn.Module):
    """Affine coupling steps written with item assignment into a private clone (`form="clone"`), then clipped
    at a boolean mask (`"mask"`), or reading a view of the written tensor before the write (`"view"`)."""

    def __init__(self, form, depth=10, width=6):
        super().__init__()
        self.nets = nn.ModuleList(nn.Linear(width // 2, width) for _ in range(depth))
        self.form, self.d = form, width // 2

    def forward(self, x):
        d = self.d
        for net in self.nets:
            st = net(x[:, :d])
            s, t = torch.tanh(st[:, :d]), st[:, d:]
            h = x.clone()
            if self.form == "clone":
                h[:, d:] = x[:, d:] * s.exp() + t
            elif self.form == "mask":  # two assignments, the second at a mask read off the first's result
                h[:, d:] = x[:, d:] * s.exp() + t
                h[h > 1.0] = 1.0
            else:
                h[:, d:] = h[:, d:] * s.exp() + t
            x = h.flip(1)
        return x


@pytest.mark.parametrize("form", ["clone", "mask"])
def test_item_assignment_into_a_private_tensor_is_rewritten_and_solved(form):
    """`h[idx] = v` on a tensor the step made itself (a clone) becomes a copy with `v` written in
    (functionalize.assign); the setitem declined every block. Values and gradients against eager."""
    torch.manual_seed(0)
    model = AssignCoupling(form).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    report = pcr_compile.explain(model, x, options=PARALLEL)
    assert [c.length for c in report.chains] == [10], report
    y0, g0, y1, g1, solves = run_both(model, (x,), PARALLEL)
    assert [(s.direction, s.converged) for s in solves] == [("forward", True), ("backward", True)]
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_item_assignment_reading_a_view_of_the_written_tensor_stays_and_declines():
    report = pcr_compile.explain(AssignCoupling("view"), torch.randn(4, 6), options=PARALLEL)
    assert not report.chains, report
    assert any("setitem" in d.reason and "view" in d.reason for d in report.declined), report
