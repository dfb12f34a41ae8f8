"""Multi-stage integrators: steps that evaluate one vector field several times (RK4, midpoint, Heun,
leapfrog) are found as one chain of whole steps, not as the field's inner repeat, and solve to eager's
values and gradients."""

import pytest
import torch
import torch.nn as nn
from helpers import PARALLEL

import pcr_compile
from pcr_compile.passes.chains import find_chains


class Field(nn.Module):
    """A small MLP vector field f(y)."""

    def __init__(self, dim=3, hidden=7):
        super().__init__()
        self.inp, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, y):
        return self.out(torch.tanh(self.inp(y)))


class Integrator(nn.Module):
    """`steps` fixed steps of size `dt` over the vector field `self.f`."""

    def __init__(self, steps=11, dt=0.1):
        super().__init__()
        self.f, self.steps, self.dt = Field(), steps, dt


class RK4(Integrator):
    def forward(self, y):
        dt = self.dt
        for _ in range(self.steps):
            k1 = self.f(y)
            k2 = self.f(y + dt / 2 * k1)
            k3 = self.f(y + dt / 2 * k2)
            k4 = self.f(y + dt * k3)
            y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y


class Midpoint(Integrator):
    def forward(self, y):
        for _ in range(self.steps):
            y = y + self.dt * self.f(y + self.dt / 2 * self.f(y))
        return y


class Heun(Integrator):
    def forward(self, y):
        for _ in range(self.steps):
            k1 = self.f(y)
            k2 = self.f(y + self.dt * k1)
            y = y + self.dt / 2 * (k1 + k2)
        return y


class Leapfrog(nn.Module):
    """Kick-drift-kick leapfrog for q'' = a(q), state (q, p); two force evaluations per step."""

    def __init__(self, steps=11, dt=0.1):
        super().__init__()
        self.a, self.steps, self.dt = Field(), steps, dt

    def forward(self, q, p):
        dt = self.dt
        for _ in range(self.steps):
            p = p + dt / 2 * self.a(q)
            q = q + dt * p
            p = p + dt / 2 * self.a(q)
        return q, p


# integrator, field evaluations per step, number of inputs
INTEGRATORS = {"rk4": (RK4, 4, 1), "midpoint": (Midpoint, 2, 1), "heun": (Heun, 2, 1), "leapfrog": (Leapfrog, 2, 2)}


def _graph(model, inputs):
    out = torch._dynamo.explain(model)(*inputs)
    assert out.graph_count == 1, out.break_reasons
    return out.graphs[0]


@pytest.mark.parametrize("name", INTEGRATORS)
def test_integrator_steps_are_one_chain(name):
    cls, evals, n_in = INTEGRATORS[name]
    model = cls(steps=11)
    inputs = [torch.randn(2, 3) for _ in range(n_in)]
    gm = _graph(model, inputs)
    analysis = find_chains(gm.graph, min_length=8)
    # The whole graph is the loop: one chain of every step, each step holding every evaluation of the field,
    # not the field's inner repeat; nothing else is reported.
    [c] = analysis.chains
    assert c.length == 11 and analysis.declined == ()
    n_compute = sum(n.op == "call_function" for n in gm.graph.nodes)
    assert c.nodes_per_step == n_compute // 11
    assert sum(n.target is torch.tanh for n in c.blocks[0]) == evals
    # the field's parameters are shared by every step
    assert c.per_step == () and len(c.invariants) == 4 and c.kind == "integrator"


@pytest.mark.parametrize("name", INTEGRATORS)
def test_integrator_compiled_matches_eager(name):
    cls, _, n_in = INTEGRATORS[name]
    torch.manual_seed(0)
    model = cls(steps=13).double()
    inputs = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(n_in)]
    params = list(model.parameters())

    def loss(out):
        return sum((o**2).sum() for o in (out if isinstance(out, tuple) else (out,)))

    ref = model(*inputs)
    g_ref = torch.autograd.grad(loss(ref), [*inputs, *params])
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    with pcr_compile.record_solves() as solves:
        out = compiled(*inputs)
        g = torch.autograd.grad(loss(out), [*inputs, *params])
    # one forward and one backward solve of the whole loop, no sequential fallback
    assert [(s.direction, s.fell_back) for s in solves] == [("forward", False), ("backward", False)]
    assert solves[0].length == 13
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_rk4_over_many_steps_is_one_chain():
    """The issue's case: RK4 over 100 steps gave 100 declined 4-step candidates and no chain."""
    gm = _graph(RK4(steps=100), [torch.randn(2, 3)])
    analysis = find_chains(gm.graph, min_length=8)
    assert [c.length for c in analysis.chains] == [100] and analysis.declined == ()


def test_a_short_integrator_is_one_declined_line():
    """4 RK4 steps: the whole loop is declined for its length, once; its inner 4-stage repeats are counted."""
    gm = _graph(RK4(steps=4), [torch.randn(2, 3)])
    analysis = find_chains(gm.graph, min_length=8)
    assert analysis.chains == ()
    [d] = analysis.declined
    assert (d.length, d.nodes_per_step) == (4, 25)
    assert d.reason == "4 steps < min_chain_length=8; 4 shorter repeats inside, each < min_chain_length=8"


class TimeField(nn.Module):
    """A time-dependent vector field f(t, y): the time enters as a feature column built by `fill` from the
    Python float t ("full_like": `torch.full_like(y[:, :1], t)`, "new_full": `y.new_full((B, 1), t)`, "mul":
    `t * torch.ones_like(...)`)."""

    def __init__(self, fill, dim=3, hidden=7):
        super().__init__()
        self.fill, self.inp, self.out = fill, nn.Linear(dim + 1, hidden), nn.Linear(hidden, dim)

    def forward(self, t, y):
        if self.fill == "full_like":
            tt = torch.full_like(y[:, :1], t)
        elif self.fill == "new_full":
            tt = y.new_full((y.shape[0], 1), fill_value=t)
        else:
            tt = t * torch.ones_like(y[:, :1])
        return self.out(torch.tanh(self.inp(torch.cat([y, tt], dim=-1))))


class TimeRK4(nn.Module):
    def __init__(self, fill, steps=12):
        super().__init__()
        self.f, self.steps = TimeField(fill), steps

    def forward(self, y):
        h = 1.0 / self.steps
        for i in range(self.steps):
            t = i * h
            k1 = self.f(t, y)
            k2 = self.f(t + h / 2, y + h / 2 * k1)
            k3 = self.f(t + h / 2, y + h / 2 * k2)
            k4 = self.f(t + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y


@pytest.mark.parametrize("fill", ["full_like", "new_full", "mul"])
def test_time_dependent_field_is_one_chain_with_eager_values_and_gradients(fill):
    """f(t, y) with t a Python float per step: every step's fill value differs, which the finder used to
    decline ("constant argument 1 of full_like differs between steps"); the fill is now a zero fill plus t
    (passes/fills.py), t a per-step input, and the whole RK4 loop one chain."""
    torch.manual_seed(0)
    model = TimeRK4(fill).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    report = pcr_compile.explain(model, y0, options=PARALLEL)
    assert [(c.kind, c.length) for c in report.chains] == [("integrator", 12)], report
    params = list(model.parameters())
    ref = model(y0)
    g_ref = torch.autograd.grad((ref**2).sum(), [y0, *params])
    with pcr_compile.record_solves() as solves:
        out = torch.compile(model, backend="deeppcr", options=PARALLEL)(y0)
        g = torch.autograd.grad((out**2).sum(), [y0, *params])
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 12, False), ("backward", 12, False)]
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_fill_rewrite_keeps_values_and_dtypes():
    """The pass rewrites a literal fill only where `zeros + v` has the fill's dtype, and keeps its value."""
    from pcr_compile.passes.fills import rewrite_fills

    def f(x, i):
        return (torch.full_like(x, 0.25), torch.full_like(x, 3, dtype=torch.float16), x.new_full((2, 2), -1.5),
                torch.full_like(i, 7), torch.full_like(i, 2.5), torch.full_like(x, True, dtype=torch.bool),
                i.new_full((3,), fill_value=4), torch.full((2,), 1.5))

    x, i = torch.randn(2, 3), torch.arange(3)
    gm = _graph(f, [x, i])
    # not the float into an integer fill, nor the bool fill, nor `full` of a literal size (the finder folds it)
    assert rewrite_fills(gm.graph) == 5
    gm.recompile()
    assert sum(n.target is torch.add for n in gm.graph.nodes) == 5
    for got, want in zip(gm(x, i), f(x, i)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class TimestepLoop(nn.Module):
    """A hand-written sampler-style loop: the step index enters as `torch.full((B,), i, dtype=torch.long)`
    into an embedding, as DDPM loops pass their timestep."""

    def __init__(self, steps=10, dim=4):
        super().__init__()
        self.emb, self.lin, self.steps = nn.Embedding(steps, dim), nn.Linear(dim, dim), steps

    def forward(self, x):
        for i in reversed(range(self.steps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            x = x - 0.1 * torch.tanh(self.lin(x) + self.emb(t))
        return x


def test_timestep_fill_with_a_symbolic_batch_is_lifted():
    """With `dynamic=True` the fill's size is symbolic, so the finder cannot fold it into a per-step input;
    the fill pass makes it `zeros((B,), dtype=long) + i`, and the loop stays one chain at every batch size."""
    torch.manual_seed(0)
    model = TimestepLoop()
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL, dynamic=True)
    with pcr_compile.record_solves() as solves:
        for batch in (3, 5):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 10, False)] * 2
