"""Residual chains (conv and MLP), Jacobian strategies per chain, and training through deeppcr."""

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

import pcr_compile
from pcr_compile import solver
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

    monkeypatch.setattr(solver.ChainCall, "jacobian_from", no_dense)
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

    monkeypatch.setattr(solver.ChainCall, "jacobian_from", no_dense)
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


def _loss_curves(blocks: int, steps: int, lr: float = 0.02, depth_scaling: str = "init"):
    torch.manual_seed(0)
    ref = ConvResNet(blocks=blocks, channels=4, in_channels=3, num_classes=5, depth_scaling=depth_scaling)
    model = ConvResNet(blocks=blocks, channels=4, in_channels=3, num_classes=5, depth_scaling=depth_scaling)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    eager = _train(ref, ref, data, steps, lr)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    with pcr_compile.record_solves() as solves:
        pcr = _train(model, compiled, data, steps, lr)
    return eager, pcr, solves


def test_depth_scaling_gives_the_same_network_at_initialisation():
    torch.manual_seed(0)
    a = ConvResNet(blocks=16, channels=4, in_channels=3, num_classes=5, depth_scaling="init")
    torch.manual_seed(0)
    b = ConvResNet(blocks=16, channels=4, in_channels=3, num_classes=5, depth_scaling="forward")
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-6)
    # the weights differ: "forward" keeps them at full size and multiplies the branch output instead
    assert b.blocks[0].conv.weight.abs().max() > 3 * a.blocks[0].conv.weight.abs().max()
    with pytest.raises(ValueError, match="depth_scaling"):
        ConvResNet(blocks=4, depth_scaling="muP")


def test_resnet_training_losses_follow_eager():
    eager, pcr, solves = _loss_curves(blocks=24, steps=12)
    for a, b in zip(pcr, eager):
        assert abs(a - b) <= 1e-3 * abs(b)
    assert sum(eager[-4:]) < sum(eager[:4])  # it does train (the data cycles through 4 batches)
    assert len(solves) == 24 and not any(s.fell_back for s in solves)


@pytest.mark.slow
def test_resnet_1024_blocks_100_training_steps_follow_eager():
    # Depth-muP scaling (the 1/sqrt(L) branch multiplier in the forward pass) trains 1024 blocks stably at
    # lr=0.3: measured 2026-11-29, the curves stay within 5.4e-7 over 100 steps, 10 Picard iterations per
    # solve, no fallback, 6.5 min on 2 cores. With the multiplier folded into the initial weights instead
    # ("init"), every block's SGD step has full size, the output moves ~L times as far per step, and the
    # training is chaotic: at lr=0.005 eager float32 itself ends 1.3 (relative) away from eager float64,
    # and eager against eager with 1e-7 relative weight noise 0.92 -- no float32 implementation can stay
    # within 1e-3 of eager there, so this test trains the stable parametrisation.
    eager, pcr, solves = _loss_curves(blocks=1024, steps=100, lr=0.3, depth_scaling="forward")
    worst = max(abs(a - b) / abs(b) for a, b in zip(pcr, eager))
    assert worst <= 1e-3, worst
    assert len(solves) == 200 and not any(s.fell_back for s in solves)
    assert sum(eager[-4:]) < sum(eager[:4])
