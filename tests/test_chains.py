"""Chain finding on Dynamo graphs: which chains are found, what is per-step / invariant, what is declined."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, dynamo_graph, graph_fingerprint, run_both
from test_integrators import RK4, Field

import pcr_compile
from pcr_compile.models import DDIMSampler, DeepMLP, MLPDenoiser, ResidualMLP
from pcr_compile.passes.chains import find_chains


def test_mlp_chain_structure_and_analysis_is_read_only():
    gm = dynamo_graph(DeepMLP(layers=11, width=4), torch.randn(2, 4))
    before = graph_fingerprint(gm.graph)
    analysis = find_chains(gm.graph, min_length=4)
    assert graph_fingerprint(gm.graph) == before  # the graph itself, not gm.code (only recompile() refreshes it)
    [c] = analysis.chains
    assert (c.length, c.nodes_per_step, c.kind) == (11, 2, "layers")
    assert len(c.per_step) == 2 and c.invariants == () and len(c.initial) == 1
    assert c.initial[0].op == "placeholder"
    targets = [n.target for n in c.blocks[0]]
    assert torch.tanh in targets


def test_nested_residual_blocks_between_stem_and_head():
    gm = dynamo_graph(ResidualMLP(blocks=9, width=6, in_features=3), torch.randn(2, 3))
    [c] = find_chains(gm.graph, min_length=4).chains
    assert c.length == 9 and c.nodes_per_step == 5
    assert len(c.per_step) == 6  # norm weight/bias, two linear weights/biases


class TwoStacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
        self.proj = nn.Linear(4, 7)
        self.b = nn.ModuleList(nn.Linear(7, 7) for _ in range(9))

    def forward(self, x):
        for lin in self.a:
            x = torch.tanh(lin(x))
        x = self.proj(x)
        for lin in self.b:
            x = torch.sigmoid(lin(x))
        return x


def test_two_chains_in_one_graph():
    gm = dynamo_graph(TwoStacks(), torch.randn(3, 4))
    chains = find_chains(gm.graph, min_length=4).chains
    assert [c.length for c in chains] == [6, 9]


class CarriesTwo(nn.Module):
    """Blocks carrying (h, c) with a loop-invariant conditioning tensor shared by every block."""

    def __init__(self, layers=10, width=5):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.shared = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, h):
        c = torch.zeros_like(h)
        for lin in self.lins:
            h, c = torch.tanh(lin(h) + 0.5 * c + self.shared), 0.8 * c + 0.2 * h
        return h + c


def test_chain_with_two_carried_tensors_and_an_invariant_input():
    model = CarriesTwo()
    gm = dynamo_graph(model, torch.randn(3, 5))
    [c] = find_chains(gm.graph, min_length=4).chains
    assert len(c.initial) == 2 and len(c.invariants) == 1 and c.length == 10
    y0, g0, y1, g1, solves = run_both(model, [torch.randn(3, 5)])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert model.shared in [p for p in model.parameters()]


class Collects(nn.Module):
    def __init__(self, layers=10):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x):
        outs = []
        for lin in self.lins:
            x = torch.tanh(lin(x))
            outs.append(x)
        return torch.stack(outs)


def test_intermediate_states_used_after_the_chain_are_exposed_not_split():
    gm = dynamo_graph(Collects(), torch.randn(2, 4))
    analysis = find_chains(gm.graph, min_length=4)
    [c] = analysis.chains
    assert c.length == 10 and analysis.declined == ()
    [q] = c.state_positions
    # every step's state but the last (the op's result) is read by torch.stack after the chain
    assert c.exposed == tuple((i, q) for i in range(9))
    [stack] = [n for n in gm.graph.nodes if n.target is torch.stack]
    assert all(c.blocks[i][q] in stack.args[0] for i in range(10))


class WithDropout(nn.Module):
    def __init__(self, layers=10, inplace=False):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))
        self.inplace = inplace

    def forward(self, x):
        for lin in self.lins:
            if self.inplace:
                x = lin(x)
                x.mul_(0.5)
            else:
                x = nn.functional.dropout(torch.tanh(lin(x)), p=0.2, training=True)
        return x


@pytest.mark.parametrize("inplace,reason", [(False, "random op"), (True, "in-place op")])
def test_ineligible_blocks_are_declined_with_reason(inplace, reason):
    gm = dynamo_graph(WithDropout(inplace=inplace), torch.randn(2, 4))
    analysis = find_chains(gm.graph, min_length=4)
    assert analysis.chains == ()
    assert any(reason in d.reason for d in analysis.declined), analysis.declined


class BooleanOperators(nn.Module):
    """A step computing boolean masks with `|` and `&` (operator.or_ / operator.and_, out of place despite
    their names' trailing underscore), beside a boolean flag carried from step to step."""

    def __init__(self, flag=False, steps=12, width=6):
        super().__init__()
        self.lin, self.flag, self.steps = nn.Linear(width, width), flag, steps

    def forward(self, x):
        done = torch.zeros(x.shape[0], dtype=torch.bool)
        for _ in range(self.steps):
            y = torch.tanh(self.lin(x))
            keep = ((y > 0.9) | (y < -0.9)) | ((y > 0) & (x > 0))
            if self.flag:
                keep = keep | done[:, None]
                done = done | (y[:, 0] > 0.5)
            x = torch.where(keep, x, y)
        return x


def test_boolean_or_and_are_not_in_place_ops():
    """`a | b` and `a & b` were taken for in-place ops (names ending in "_"): the step was declined as
    "in-place op or_". It is a chain, solved with eager's values; a carried boolean flag is declined for
    what it is."""
    x = torch.randn(4, 6, dtype=torch.float64)
    [c] = find_chains(dynamo_graph(BooleanOperators().double(), x).graph, min_length=8).chains
    assert c.length == 12
    torch.manual_seed(0)
    y0, g0, y1, g1, solves = run_both(BooleanOperators().double(), [x])
    assert rel_err(y1, y0) < 1e-9 and grads_rel_err(g1, g0) < 1e-9
    assert [(s.direction, s.fell_back) for s in solves] == [("forward", False), ("backward", False)]
    analysis = find_chains(dynamo_graph(BooleanOperators(flag=True).double(), x).graph, min_length=8)
    assert analysis.chains == ()
    assert [d.reason for d in analysis.declined] == ["the carried state done is not a floating-point tensor"]


class AttentionStack(nn.Module):
    """Self-attention blocks; `dropout_p` is the attention's own dropout (training mode, e.g. attn_pdrop)."""

    def __init__(self, layers=10, dim=8, dropout_p=0.0):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.dropout_p = dropout_p

    def forward(self, x):
        for qkv in self.qkv:
            q, k, v = qkv(x).chunk(3, dim=-1)
            x = x + nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)
        return x


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_attention_dropout_is_random(dropout_p):
    """SDPA with dropout_p > 0 draws a mask per call: solved out of order it would be wrong, so it declines."""
    x = torch.randn(2, 5, 8)
    gm = dynamo_graph(AttentionStack(dropout_p=dropout_p), x)
    analysis = find_chains(gm.graph, min_length=4)
    if dropout_p:
        assert analysis.chains == ()
        assert any("random op scaled_dot_product_attention with dropout_p=0.1" in d.reason
                   for d in analysis.declined), analysis.declined
    else:
        [c] = analysis.chains
        assert c.length == 10
        y0, g0, y1, g1, solves = run_both(AttentionStack(), [x])
        assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4 and len(solves) == 2


def test_short_chains_are_left_alone():
    gm = dynamo_graph(DeepMLP(layers=5, width=3), torch.randn(2, 3))
    analysis = find_chains(gm.graph, min_length=8)
    assert analysis.chains == ()
    assert any("min_chain_length=8" in d.reason for d in analysis.declined)


def test_sampler_loop_lifts_per_step_constants():
    gm = dynamo_graph(DDIMSampler(MLPDenoiser(), steps=12), torch.randn(4, 2))
    [c] = find_chains(gm.graph, min_length=4).chains
    assert c.kind == "sampler" and c.length == 12
    assert len(c.lifted) + len(c.folded) >= 2  # the timestep and the update's coefficients
    assert c.per_step == () and len(c.invariants) == 6  # the denoiser's parameters are shared


def test_sampler_loop_compiled_matches_eager():
    model = DDIMSampler(MLPDenoiser(), steps=15)
    x = torch.randn(8, 2)
    with torch.no_grad():
        y0 = model(x)
        y1 = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    assert rel_err(y1, y0) < 1e-4


def test_chains_inside_a_torch_func_transform_are_declined_and_the_rest_solved():
    """`torch.compile(torch.func.grad(f))`: Dynamo traces the transform into the graph (between functorch's
    _grad_increment_nesting and _grad_decrement_nesting, calls with no users). The rewrite's dead-code elimination
    removed those calls, and Inductor's compile of the rewritten graph failed (functorch's INTERNAL ASSERT on its
    level stack; without strict, a warning and the original graph). A chain inside the transform is declined,
    naming it (the chain op cannot take its wrapped tensors); a chain outside it is solved (strict: no fallback)."""
    torch.manual_seed(0)
    model = DeepMLP(layers=10, width=4)
    x = torch.randn(3, 4)
    inner = torch.func.grad(lambda x: model(x).sum())
    [d] = pcr_compile.explain(inner, x, options=PARALLEL).declined
    assert "torch.func transform" in d.reason and "_grad_increment_nesting" in d.reason
    both = pcr_compile.explain(lambda x: model(x) + inner(x), x, options=PARALLEL)
    assert [c.length for c in both.chains] == [10] and len(both.declined) == 1
    torch._dynamo.reset()
    with pcr_compile.record_solves() as solves:
        y = torch.compile(lambda x: model(x) + inner(x), backend="deeppcr", options=PARALLEL)(x)
    assert [s.direction for s in solves] == ["forward"]
    torch.testing.assert_close(y, model(x) + inner(x), rtol=1e-5, atol=1e-6)


class PreNormTransformerish(nn.Module):
    """Two residual branches per block (x1 = x + a(x); x2 = x1 + m(x1)) over a wide state."""

    def __init__(self, blocks=9, width=80):
        super().__init__()
        self.a = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(blocks))
        self.m = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                               for _ in range(blocks))
        for mod in [*self.a, *self.m]:
            nn.init.normal_(mod[1].weight, std=0.02)

    def forward(self, x):
        for a, m in zip(self.a, self.m):
            x = x + a(x)
            x = x + m(x)
        return x


def test_blocks_with_two_residual_branches_choose_picard():

    model = PreNormTransformerish()
    x = torch.randn(2, 80)
    [c] = pcr_compile.explain(model, x, options={**PARALLEL, "min_chain_length": 4}).chains
    assert c.length == 9 and c.jacobian == "identity" and "residual" in c.reason
    y0, g0, y1, g1, solves = run_both(model, [x], {**PARALLEL, "min_chain_length": 4})
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4


class Checkpointed(nn.Module):
    """Blocks wrapped in torch.utils.checkpoint: Dynamo gives each call its own body submodule."""

    def __init__(self, layers=10, switch_at=None, dropout=0.0):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(5, 5) for _ in range(layers))
        self.switch_at, self.dropout = switch_at, dropout

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for i, lin in enumerate(self.lins):
            act = torch.sigmoid if self.switch_at is not None and i >= self.switch_at else torch.tanh
            x = checkpoint(lambda z, lin=lin, act=act: nn.functional.dropout(act(lin(z)), self.dropout),
                           x, use_reentrant=False)
        return x


def test_checkpointed_blocks_form_a_chain_with_the_body_inlined():
    """The chain op keeps only the trajectory for its backward, so checkpointing inside it is moot: the
    bodies (equal graphs, one per step) are inlined into the template and the chain is solved."""
    x = torch.randn(3, 5)
    gm = dynamo_graph(Checkpointed(), x)
    [c] = find_chains(gm.graph, min_length=4).chains
    assert c.length == 10 and c.submodules == ("wrap_body_0",) and len(c.per_step) == 2
    torch.manual_seed(0)
    y0, g0, y1, g1, solves = run_both(Checkpointed(), [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 10, False), ("backward", 10, False)]


def test_checkpointed_bodies_are_checked_inside():
    x = torch.randn(3, 5)
    # a random op inside the body declines the chain
    analysis = find_chains(dynamo_graph(Checkpointed(dropout=0.2), x).graph, min_length=4)
    assert analysis.chains == ()
    assert any("random op dropout" in d.reason and "inside wrap_body" in d.reason for d in analysis.declined)
    # bodies that compute different functions split the run where they change
    analysis = find_chains(dynamo_graph(Checkpointed(layers=16, switch_at=8), x).graph, min_length=4)
    assert [c.length for c in analysis.chains] == [8, 8]


class GPT2ishBlock(nn.Module):
    """Pre-norm attention + MLP with residual dropout, as GPT-2's block (resid_pdrop)."""

    def __init__(self, dim=16, heads=2, p=0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop, self.heads = nn.Dropout(p), heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.out(nn.functional.gelu(self.fc(self.ln2(x)))))


class GPT2ish(nn.Module):
    def __init__(self, layers=8, p=0.1):
        super().__init__()
        self.blocks = nn.ModuleList(GPT2ishBlock(p=p) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_declined_stack_is_one_line_with_its_sub_repeats_counted():
    """Dropout declines the 8-block stack; the 3-step repeats inside each block (the q, k, v views) are not
    listed one by one, only counted in the stack's line."""

    report = pcr_compile.explain(GPT2ish().train(), torch.randn(2, 5, 16))
    assert report.chains == []
    [d] = report.declined
    assert (d.length, d.nodes_per_step) == (8, 24)
    assert d.reason.startswith("block contains random op dropout")
    assert "16 shorter repeats inside, each < min_chain_length=8" in d.reason
    # in eval mode the same stack is a chain and nothing is declined
    report = pcr_compile.explain(GPT2ish().eval(), torch.randn(2, 5, 16))
    assert [c.length for c in report.chains] == [8] and report.declined == []


class NoisyField(Field):
    """test_integrators' field with a random perturbation in every evaluation."""

    def forward(self, y):
        return super().forward(y) + 1e-3 * torch.randn_like(y)


class NoisyRK4(RK4):
    """The RK4 loop of test_integrators over a field that draws random numbers."""

    def __init__(self):
        super().__init__()
        self.f = NoisyField()


def test_a_declined_integrator_is_one_line():
    """A random draw per step declines the RK4 loop once, as a whole; its 4-stage inner repeats are counted."""
    analysis = find_chains(dynamo_graph(NoisyRK4(), torch.randn(2, 3)).graph, min_length=8)
    assert analysis.chains == ()
    assert len(analysis.declined) == 1 and "random op" in analysis.declined[0].reason, analysis.declined
    assert "shorter repeats inside" in analysis.declined[0].reason


class CellOverTime(nn.Module):
    """`for t: h = cell(x[:, t], h)` with nn.RNNCell / nn.GRUCell / nn.LSTMCell; `unbind` slices the sequence
    before the loop instead."""

    def __init__(self, cell="rnn", features=3, hidden=5, unbind=False):
        super().__init__()
        self.kind, self.unbind = cell, unbind
        self.cell = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](features, hidden)

    def forward(self, xs, h):
        c = torch.zeros_like(h)
        steps = xs.unbind(1) if self.unbind else range(xs.shape[1])
        for x in steps:
            x = x if self.unbind else xs[:, x]
            if self.kind == "lstm":
                h, c = self.cell(x, (h, c))
            else:
                h = self.cell(x, h)
        return h


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("unbind", [False, True], ids=["index", "unbind"])
def test_cells_over_a_sequence_are_recurrences(cell, unbind):
    gm = dynamo_graph(CellOverTime(cell, unbind=unbind), torch.randn(2, 12, 3), torch.randn(2, 5))
    [c] = find_chains(gm.graph, min_length=8).chains
    assert c.length >= 11 and c.kind == "recurrence"


class Euler(nn.Module):
    """`y <- y + dt * f(t, y)`; with `time`, the field reads the step's time (a per-step constant)."""

    def __init__(self, steps=12, dt=0.05, time=False, width=3):
        super().__init__()
        self.inp, self.out = nn.Linear(width, 8), nn.Linear(8, width)
        self.time_weight = nn.Parameter(torch.randn(8))
        self.steps, self.dt, self.time = steps, dt, time

    def forward(self, y):
        for i in range(self.steps):
            h = self.inp(y) + (i * self.dt) * self.time_weight if self.time else self.inp(y)
            y = y + self.dt * self.out(torch.tanh(h))
        return y


class ScaledByStep(nn.Module):
    """Per-step parameters as slices of one parameter, `self.a[i]`: layers (the stacked parameter itself is the
    per-step input, no index is lifted)."""

    def __init__(self, steps=12):
        super().__init__()
        self.a = nn.Parameter(torch.rand(steps) * 0.5)
        self.b = nn.Parameter(torch.randn(steps))

    def forward(self, x):
        for i in range(len(self.a)):
            x = torch.tanh(self.a[i] * x + self.b[i])
        return x


@pytest.mark.parametrize("model,inputs,kind", [
    (Euler(), (torch.randn(2, 3),), "integrator"),
    (Euler(time=True), (torch.randn(2, 3),), "integrator"),
    (DDIMSampler(MLPDenoiser(), steps=12), (torch.randn(4, 2),), "sampler"),
    (DeepMLP(layers=12, width=4), (torch.randn(2, 4),), "layers"),
    (ScaledByStep(), (torch.randn(3),), "layers"),
    (CarriesTwo(), (torch.randn(3, 5),), "layers"),
], ids=["euler", "euler-time", "ddim", "mlp", "indexed-parameters", "two-states"])
def test_kinds(model, inputs, kind):
    [c] = find_chains(dynamo_graph(model, *inputs).graph, min_length=8).chains
    assert c.kind == kind


@pytest.mark.parametrize("model,inputs,jacobian", [
    # large states: the strategies chosen when these kinds read "sampler" (lifted constants) or "layers"
    (CellOverTime("rnn", hidden=80), (torch.randn(2, 12, 3), torch.randn(2, 80)), "identity"),  # index lifted
    (CellOverTime("rnn", hidden=80, unbind=True), (torch.randn(2, 12, 3), torch.randn(2, 80)), "zero"),
    (Euler(width=80, time=True), (torch.randn(2, 80),), "identity"),
    (Euler(width=80), (torch.randn(2, 80),), "identity"),  # residual
    # a stacked-parameter stack is chosen as its ModuleList twin is: a non-residual wide chain, Jacobi
    (ScaledByStep(), (torch.randn(2, 80),), "zero"),
], ids=["rnn-index", "rnn-unbind", "euler-time", "euler", "indexed-parameters"])
def test_new_kinds_keep_their_jacobian_strategies(model, inputs, jacobian):

    [c] = pcr_compile.explain(model, *inputs, options={"mode": "parallel", "dense_budget": 1}).chains
    assert c.jacobian == jacobian, c.reason
