"""Blocks that read a value from two steps back: carried through the step between, then solved as chains."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

import pcr_compile
from pcr_compile.passes.carry import carry_lagged_values
from pcr_compile.passes.chains import find_chains


class SecondOrder(nn.Module):
    """`x, prev = f(x) + 0.5 * prev, x`; `prev` starts as `x` or, with `zero_start`, as zeros."""

    def __init__(self, layers=12, width=6, zero_start=False):
        super().__init__()
        torch.manual_seed(0)
        self.zero_start = zero_start
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        prev = torch.zeros_like(x) if self.zero_start else x
        for lin in self.lins:
            x, prev = torch.tanh(lin(x)) + 0.5 * prev, x
        return x + prev


class Verlet(nn.Module):
    """Störmer-Verlet in position form, `x' = 2 x - x_prev + h^2 a(x)`, with a learned force field."""

    def __init__(self, steps=16, dim=4, h=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.h = h
        self.force = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim))
        self.steps = steps

    def forward(self, x0, v0):
        prev, x = x0, x0 + self.h * v0
        for _ in range(self.steps):
            x, prev = 2 * x - prev + self.h**2 * self.force(x), x
        return x


def dynamo_graph(model, *inputs):
    out = torch._dynamo.explain(model)(*inputs)
    assert out.graph_count == 1, out.break_reasons
    return out.graphs[0]


def test_finder_reports_the_lagged_run_and_the_carry_makes_it_a_chain():
    gm = dynamo_graph(SecondOrder(), torch.randn(3, 6))
    before = find_chains(gm.graph, min_length=8)
    assert before.chains == ()
    assert any("two steps back" in d.reason for d in before.declined)
    [run] = before.lagged
    blocks, slots = run.blocks, run.slots
    assert len(blocks) == 12 and len(slots) == 1
    assert carry_lagged_values(gm.graph)[0] == 1
    gm.recompile()
    [chain] = find_chains(gm.graph, min_length=8).chains
    assert chain.length == 12 and len(chain.state_positions) == 2  # x and the carried copy of prev


@pytest.mark.parametrize("zero_start", [False, True])
def test_second_order_recurrence_values_and_gradients(zero_start):
    model = SecondOrder(zero_start=zero_start)
    x = torch.randn(3, 6)
    [chain] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert chain.length >= 11
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [s.direction for s in solves] == ["forward", "backward"] and not any(s.fell_back for s in solves)


def test_verlet_integrator_is_one_chain():
    """Here Dynamo's order already makes the recurrence first order (`2 x - prev` is computed in the step
    before the force), so no copy is needed; the phase choice must still find it."""
    model = Verlet()
    x0, v0 = torch.randn(5, 4), torch.randn(5, 4)
    [chain] = pcr_compile.explain(model, x0, v0, options=PARALLEL).chains
    assert chain.length == 15  # the first `2 x - prev` precedes the first force evaluation
    y0, g0, y1, g1, solves = run_both(model, [x0, v0])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert solves[0].length == 15


class ReadsValuesMadeJustBefore(nn.Module):
    """Every layer reads values computed right before the first one (as rotary cos/sin tables are in
    Llama): outside the run, they are invariants, and must not count as reads from two blocks back."""

    def __init__(self, layers=8, width=6):
        super().__init__()
        torch.manual_seed(0)
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.gate = nn.Linear(width, width)
        self.shift = nn.Parameter(torch.randn(width))

    def forward(self, x):
        scale = torch.sigmoid(self.gate(x.mean(0)))
        bias = torch.cos(self.shift)
        for lin in self.lins:
            x = torch.tanh(lin(x) * scale + bias)
        return x


def test_invariants_made_just_before_the_run_keep_the_first_block_boundary():
    model = ReadsValuesMadeJustBefore()
    x = torch.randn(3, 6)
    [chain] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert chain.length == 8 and chain.invariant_inputs >= 2
