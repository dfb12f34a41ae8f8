"""Chain finding on Dynamo graphs: which chains are found, what is per-step / invariant, what is declined."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

from pcr_compile.models import DDIMSampler, DeepMLP, MLPDenoiser, ResidualMLP
from pcr_compile.passes.chains import find_chains


def dynamo_graph(model, *inputs):
    out = torch._dynamo.explain(model)(*inputs)
    assert out.graph_count == 1, out.break_reasons
    return out.graphs[0]


def test_mlp_chain_structure_and_analysis_is_read_only():
    gm = dynamo_graph(DeepMLP(layers=11, width=4), torch.randn(2, 4))
    before = gm.code
    analysis = find_chains(gm.graph, min_length=4)
    assert gm.code == before
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


class Autocast(nn.Module):
    def __init__(self, layers=10):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for lin in self.lins:
                x = torch.tanh(lin(x))
        return x.float()


def test_chains_inside_autocast_are_declined_and_still_correct():
    model = Autocast()
    x = torch.randn(3, 4)
    gm = dynamo_graph(model, x)
    analysis = find_chains(gm.graph, min_length=4)
    assert analysis.chains == () and any("autocast" in d.reason for d in analysis.declined)
    y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    torch.testing.assert_close(y, model(x), rtol=2e-2, atol=2e-2)


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
    import pcr_compile

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


@pytest.mark.parametrize("bias", [True, False])
def test_recurrent_cell_compositions_equal_the_kernels_and_batch_under_vmap(bias):
    from pcr_compile.passes.vmap_compat import gru_cell, lstm_cell

    torch.manual_seed(0)
    lstm = nn.LSTMCell(4, 6, bias=bias).double()
    gru = nn.GRUCell(4, 6, bias=bias).double()
    x, h, c = (torch.randn(5, 3, n, dtype=torch.float64) for n in (4, 6, 6))  # 5 steps of a batch of 3
    lw = (lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh)
    gw = (gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
    for i in range(5):
        for a, b in zip(lstm_cell(x[i], (h[i], c[i]), *lw), torch.lstm_cell(x[i], (h[i], c[i]), *lw)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gru_cell(x[i], h[i], *gw), torch.gru_cell(x[i], h[i], *gw), rtol=1e-12, atol=1e-12)
    hb, cb = torch.vmap(lambda x, h, c: lstm_cell(x, (h, c), *lw))(x, h, c)
    torch.testing.assert_close(hb[2], lstm_cell(x[2], (h[2], c[2]), *lw)[0])
    torch.testing.assert_close(torch.vmap(lambda x, h: gru_cell(x, h, *gw))(x, h)[4], gru_cell(x[4], h[4], *gw))
