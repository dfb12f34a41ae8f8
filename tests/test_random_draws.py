"""Stochastic loops: noise drawn from shapes alone moves to the top of the graph (passes/random_draws.py), so a
hand-written DDPM / Langevin loop is one chain, with eager's numbers from the same seed."""

import pytest
import torch
import torch.nn as nn
from helpers import PARALLEL, dynamo_graph

import pcr_compile
from pcr_compile.passes.random_draws import hoist_random_draws

T = 20


class Eps(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(T, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(x + self.emb(t))))


class DDPMLoop(nn.Module):
    """Ancestral DDPM sampling as tutorials write it: the timestep a `torch.full`, noise `randn_like(x)` after
    every step but the last."""

    def __init__(self):
        super().__init__()
        self.eps = Eps()
        b = torch.linspace(1e-4, 0.05, T, dtype=torch.float64)
        a = 1 - b
        ab = torch.cumprod(a, 0)
        self.c1, self.c2, self.sig = (b / (1 - ab).sqrt()).tolist(), (1 / a.sqrt()).tolist(), b.sqrt().tolist()

    def forward(self, x):
        for i in reversed(range(T)):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            x = (x - self.c1[i] * self.eps(x, t)) * self.c2[i]
            if i > 0:
                x = x + self.sig[i] * torch.randn_like(x)
        return x


def test_ddpm_loop_with_noise_in_the_loop_is_one_sampler_chain():
    report = pcr_compile.explain(DDPMLoop(), torch.randn(4, 8), options=PARALLEL)
    # every step that draws noise (the last one does not, and stays outside)
    assert [(c.kind, c.length) for c in report.chains] == [("sampler", T - 1)], report
    assert not report.declined, report  # the moved draws are no candidate of their own


@pytest.mark.parametrize("dynamic", [False, True])
def test_ddpm_loop_compiled_gives_eager_numbers_from_the_same_seed(dynamic):
    """With Inductor drawing through eager's generator (`fallback_random`), the compiled sample is eager's
    sample from the same seed: the moved draws consume the generator in eager's order."""
    torch.manual_seed(0)
    model = DDPMLoop()
    x = torch.randn(4, 8)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL, dynamic=dynamic)
    with torch._inductor.config.patch(fallback_random=True), torch.no_grad(), pcr_compile.record_solves() as solves:
        for seed in (1, 2):
            torch.manual_seed(seed)
            ref = model(x)
            torch.manual_seed(seed)
            out = compiled(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", T - 1, False)] * 2


def test_draws_move_to_the_top_in_order_with_the_same_numbers():
    def f(x, i):
        y = torch.tanh(x) + torch.randn_like(x)
        y = y * torch.rand(2, 3)
        z = torch.randint_like(i, 0, 10) + i
        return y + torch.normal(0.0, 2.0, (2, 3)), z

    x, i = torch.randn(2, 3), torch.arange(4)
    gm = dynamo_graph(f, x, i)
    assert hoist_random_draws(gm.graph) == 4
    gm.recompile()
    compute = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in compute[:4]] == [torch.randn, torch.rand, torch.randint, torch.normal]
    torch.manual_seed(3)
    want = f(x, i)
    torch.manual_seed(3)
    got = gm(x, i)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_graphs_with_a_draw_that_cannot_move_are_left_alone():
    def with_dropout(x):
        return torch.nn.functional.dropout(torch.randn_like(x) + x, 0.5, training=True)

    def transposed(x):
        xt = x.t()  # not contiguous: randn_like fills it in its own memory order
        return xt + torch.randn_like(xt)

    for fn, x in ((with_dropout, torch.randn(2, 3)), (transposed, torch.randn(2, 3))):
        gm = dynamo_graph(fn, x)
        before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
        assert hoist_random_draws(gm.graph) == 0
        assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


def test_a_loop_with_dropout_in_training_stays_declined():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(10):
                x = torch.nn.functional.dropout(torch.tanh(self.lin(x)), 0.1, training=True)
                x = x + 0.01 * torch.randn_like(x)
            return x

    report = pcr_compile.explain(Noisy(), torch.randn(2, 4), options=PARALLEL)
    assert not report.chains, report
    assert any("random op" in d.reason for d in report.declined), report


class Langevin(nn.Module):
    """Unadjusted Langevin steps with the noise drawn as `torch.randn(x.shape)` (a size read off the state)."""

    def __init__(self, steps=12):
        super().__init__()
        self.score, self.steps = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)), steps

    def forward(self, x):
        for _ in range(self.steps):
            x = x + 0.01 * self.score(x) + 0.1 * torch.randn(x.shape, device=x.device)
        return x


@pytest.mark.parametrize("dynamic", [False, True])
def test_langevin_noise_sized_from_the_state_moves(dynamic):
    """With a symbolic batch the size is `x.size()` of a state inside the loop: it is rebuilt from the graph's
    size inputs at the top."""
    torch.manual_seed(0)
    model = Langevin()
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL, dynamic=dynamic)
    with torch._inductor.config.patch(fallback_random=True), torch.no_grad(), pcr_compile.record_solves() as solves:
        for batch in (3, 5):
            x = torch.randn(batch, 6)
            torch.manual_seed(batch)
            ref = model(x)
            torch.manual_seed(batch)
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    assert [(s.direction, s.length) for s in solves][-1] == ("forward", 12)
    assert all(not s.fell_back for s in solves)


class StochasticDepth(nn.Module):
    """Residual blocks dropped per sample in training (stochastic depth): each block's keep mask is a
    `torch.rand(B, 1)` draw, and the model's first op is the first block's draw."""

    def __init__(self, depth=10, p=0.3):
        super().__init__()
        self.layers, self.p = nn.ModuleList(nn.Linear(6, 6) for _ in range(depth)), p

    def forward(self, x):
        for layer in self.layers:
            keep = (torch.rand(x.shape[0], 1) > self.p).to(x.dtype) / (1 - self.p)
            x = x + keep * torch.tanh(layer(x))
        return x


def test_stochastic_depth_whose_first_op_is_a_draw_trains_as_a_chain():
    """The first draw was the graph's first node, the one the draws were inserted before: once it had moved
    (and been erased) the later draws went in before a node no longer in the graph, out of order, and the
    rewrite failed the graph lint (Inductor compiled the original graph; `strict` raised)."""
    torch.manual_seed(0)
    model = StochasticDepth().double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    with torch._inductor.config.patch(fallback_random=True), pcr_compile.record_solves() as solves:
        for seed in (1, 2):
            torch.manual_seed(seed)
            ref = model(x)
            want = torch.autograd.grad(ref.pow(2).sum(), [x, *model.parameters()])
            torch.manual_seed(seed)
            out = compiled(x)
            got = torch.autograd.grad(out.pow(2).sum(), [x, *model.parameters()])
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert [(s.direction, s.length, s.converged) for s in solves] == [("forward", 10, True), ("backward", 10, True)] * 2
