"""Residual chains (conv and MLP), Jacobian strategies per chain, and training through deeppcr."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

import pcr_compile
from pcr_compile import solve
from pcr_compile.models import ConvResNet, DeepMLP, ResidualMLP


def test_conv_residual_chain_values_and_grads():
    model = ConvResNet(blocks=12, channels=6, in_channels=3, num_classes=5)
    x = torch.randn(3, 3, 7, 7)
    report = pcr_compile.explain(model, x, options=PARALLEL)
    [c] = report.chains
    assert c.length == 12 and c.state_shape == (3, 6, 7, 7)
    assert c.jacobian == "identity" and "residual" in c.reason  # 294 features per row: matrix-free Picard
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert {(s.direction, s.jacobian) for s in solves} == {("forward", "identity"), ("backward", "identity")}
    assert all(s.converged and not s.fell_back for s in solves)


@pytest.mark.parametrize("jacobian", ["dense", "diagonal", "identity", "zero"])
def test_residual_mlp_under_every_jacobian_strategy(jacobian):
    model = ResidualMLP(blocks=10, width=6, in_features=4, out_features=3)
    x = torch.randn(5, 4)
    y0, g0, y1, g1, solves = run_both(model, [x], {**PARALLEL, "jacobian": jacobian})
    assert rel_err(y1, y0) < 1e-5
    assert grads_rel_err(g1, g0) < 1e-4  # the backward is exact whatever the forward strategy
    fwd, bwd = solves
    assert fwd.jacobian == jacobian and fwd.converged and not fwd.fell_back
    assert bwd.converged and not bwd.fell_back


def test_diagonal_strategy_uses_the_closed_form_for_linear_pointwise_blocks(monkeypatch):
    def no_dense(*a, **k):
        raise AssertionError("a dense Jacobian was materialised")

    monkeypatch.setattr(solve.ChainCall, "jacobian_from", no_dense)
    model = DeepMLP(layers=20, width=6, activation="tanh", gain=0.9)
    x = torch.randn(4, 6)
    y0, g0, y1, g1, solves = run_both(model, [x], {**PARALLEL, "jacobian": "diagonal"})
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [s.jacobian for s in solves] == ["diagonal", "diagonal"]


class Gated(nn.Module):
    """x + g_l * tanh(W_l x + b_l) with a learned scalar gate per block (as in ReZero)."""

    def __init__(self, blocks=12, width=5):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.gates = nn.ParameterList(nn.Parameter(torch.tensor(0.3)) for _ in range(blocks))

    def forward(self, x):
        for lin, g in zip(self.lins, self.gates):
            x = x + g * torch.tanh(lin(x))
        return x


def test_block_with_learned_scalar_gate():
    model = Gated()
    x = torch.randn(4, 5)
    report = pcr_compile.explain(model, x, options=PARALLEL)
    [c] = report.chains
    assert c.length == 12 and c.per_step_inputs == 3  # weight, bias and the gate
    y0, g0, y1, g1, _ = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert all(p.grad is None for p in model.parameters())  # run_both uses autograd.grad


def test_large_state_residual_chain_is_solved_matrix_free(monkeypatch):
    """16,384 features per row: dense Jacobians would be 10 x 2 x 16384^2 floats (21 GB)."""
    def no_dense(*a, **k):
        raise AssertionError("a dense Jacobian was materialised")

    monkeypatch.setattr(solve.ChainCall, "jacobian_from", no_dense)
    model = ConvResNet(blocks=10, channels=16, in_channels=3, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    [c] = pcr_compile.explain(model, x, options=PARALLEL).chains
    assert c.jacobian == "identity" and "large state" in c.reason
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert all(s.jacobian == "identity" for s in solves)


def _train(model, step_fn, data, steps, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(step_fn(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _loss_curves(blocks: int, steps: int, lr: float = 0.02):
    torch.manual_seed(0)
    ref = ConvResNet(blocks=blocks, channels=4, in_channels=3, num_classes=5)
    model = ConvResNet(blocks=blocks, channels=4, in_channels=3, num_classes=5)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    eager = _train(ref, ref, data, steps, lr)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    with pcr_compile.record_solves() as solves:
        pcr = _train(model, compiled, data, steps, lr)
    return eager, pcr, solves


def test_resnet_training_losses_follow_eager():
    eager, pcr, solves = _loss_curves(blocks=24, steps=12)
    for a, b in zip(pcr, eager):
        assert abs(a - b) <= 1e-3 * abs(b)
    assert sum(eager[-4:]) < sum(eager[:4])  # it does train (the data cycles through 4 batches)
    assert len(solves) == 24 and not any(s.fell_back for s in solves)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-11-29: the curves agree to 1e-6 for 35 steps, then drift past 1e-3 (8e-4 at step 40, "
    "1.8e-2 at step 55, 0.44 at step 90); whether the per-step tolerance or the training's own sensitivity "
    "causes it is not isolated yet (issue 4 stays open)"))
def test_resnet_1024_blocks_100_training_steps_follow_eager():
    # At lr=0.02 this 1024-block net's loss spikes (1.5 -> 7.6 in three steps) and the deeppcr and eager
    # curves, 2e-7 apart at first, drift to 2e-3 by step 42 and 0.4 by step 100 (measured 2026-11-29); at
    # lr=0.005 the drift starts later (see the xfail reason).
    eager, pcr, solves = _loss_curves(blocks=1024, steps=100, lr=0.005)
    worst = max(abs(a - b) / abs(b) for a, b in zip(pcr, eager))
    assert worst <= 1e-3, worst
    assert sum(eager[-4:]) < sum(eager[:4])
