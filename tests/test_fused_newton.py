"""Tests of ``pcr_compile.solver.newton_linear_pointwise`` against an eager sequential loop.

Chains ``z_l = act(z_{l-1} @ W_l^T + b_l)`` (and the residual form ``z_{l-1} + act(...)``) with weights
scaled so the chain contracts; the reference runs the layers one by one in float64. Triton cases run on
CUDA, or on CPU under ``TRITON_INTERPRET=1`` with small shapes (interpreted Triton is slow).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pcr_compile.kernels.activations import ACTIVATIONS
from pcr_compile.kernels.triton_newton import fused_newton_launch
from pcr_compile.solver import NewtonResult, newton_linear_pointwise
from pcr_compile.solver.residual import tiny

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]
ACT_FN = {
    "identity": lambda a: a,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}
# tolerance passed to the solver, and the accepted error against the float64 loop (relative to its scale).
# The step residual is measured against each step's own size, row by row: in float32 its rounding floor is
# about 1e-6 (ten ulps of the cancellation f_l - J_l z_{l-1}), so float32 solves ask for 1e-5.
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 3e-2),
       torch.float16: (1e-5, 5e-3)}


def skip_unless_runnable(impl: str, device: str) -> None:
    if impl == "triton" and device == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before Triton is imported")


def make_chain(L, w, batch, *, residual, bias=True, device="cpu", seed=0):
    """float64 weights with a contracting chain: ||W_l|| about 0.6 (plain) or 0.2 (residual form)."""
    g = torch.Generator().manual_seed(seed)
    scale = (0.1 if residual else 0.3) / w**0.5
    W = torch.randn(L, w, w, generator=g, dtype=torch.float64) * scale
    b = torch.randn(L, w, generator=g, dtype=torch.float64) * 0.1 if bias else None
    z0 = torch.randn(*batch, w, generator=g, dtype=torch.float64)
    return z0.to(device), W.to(device), None if b is None else b.to(device)


def sequential(z0, W, bias, activation, residual):
    """Eager layer-by-layer loop in float64: the oracle."""
    z, out = z0.double(), []
    for layer in range(W.shape[0]):
        a = z @ W[layer].double().T + (0 if bias is None else bias[layer].double())
        z = z + ACT_FN[activation](a) if residual else ACT_FN[activation](a)
        out.append(z)
    return torch.stack(out)


def assert_solved(res: NewtonResult, ref: torch.Tensor, dtype: torch.dtype, max_iters: int | None = None):
    assert isinstance(res, NewtonResult)
    assert res.converged, res.residuals
    assert res.traj.shape == ref.shape and res.traj.dtype == dtype
    assert len(res.residuals) == res.iterations + 1 and res.residual == res.residuals[-1]
    if max_iters is not None:
        assert res.iterations <= max_iters
    err = TOL[dtype][1] * max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(res.traj.double().cpu(), ref.cpu(), atol=err, rtol=TOL[dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_sequential(activation, residual, impl, device):
    skip_unless_runnable(impl, device)
    interpreted = impl == "triton" and device == "cpu"
    L, w, batch = (5, 3, (1,)) if interpreted else (37, 5, (3,))
    z0, W, bias = make_chain(L, w, batch, residual=residual, device=device, seed=L + w)
    for dtype in (torch.float64,) if interpreted else (torch.float64, torch.float32):
        z0_, W_, b_ = z0.to(dtype), W.to(dtype), bias.to(dtype)
        res = newton_linear_pointwise(
            z0_, W_, b_, activation=activation, residual=residual, tol=TOL[dtype][0], max_iters=L, impl=impl
        )
        assert_solved(res, sequential(z0_, W_, b_, activation, residual), dtype)


CHUNKED = [("tanh", 5, False, 2), ("gelu", 3, True, 3), ("silu", 17, False, 3), ("relu", 4, True, 2)]
CHUNKED_IDS = [f"{a}-w{w}-r{r:d}-c{c}" for a, w, r, c in CHUNKED]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,w,residual,chunk", CHUNKED, ids=CHUNKED_IDS)
def test_triton_chunked_newton(activation, w, residual, chunk, device):
    """The two-level Newton step (chunk maps, carries, rescan), forced with small chunks; w=17 uses tl.dot."""
    skip_unless_runnable("triton", device)
    z0, W, bias = make_chain(6, w, (1,), residual=residual, device=device, seed=chunk)
    Z, it, conv, residuals = fused_newton_launch(z0, W, bias, activation, residual, 1e-11, 6, tiny(z0.dtype),
                                                 chunk=chunk, check_every=2)
    assert conv and len(residuals) == it + 1
    torch.testing.assert_close(Z, sequential(z0, W, bias, activation, residual), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_triton_and_torch_agree_on_iterations(impl, device):
    skip_unless_runnable(impl, device)
    z0, W, bias = make_chain(6, 4, (1,), residual=False, device=device, seed=5)
    res = newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-12, max_iters=6, impl=impl)
    args = (z0.cpu(), W.cpu(), bias.cpu())
    ref = newton_linear_pointwise(*args, activation="tanh", tol=1e-12, max_iters=6, impl="torch")
    assert res.converged and ref.converged
    assert res.iterations == ref.iterations
    assert res.residuals == pytest.approx(ref.residuals, rel=1e-3, abs=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_256_layer_tanh_chain_converges_fast(impl, device):
    """DeepPCR's regime: a deep, narrow, contractive chain converges in a handful of Newton iterations."""
    skip_unless_runnable(impl, device)
    if impl == "triton" and device == "cpu":
        pytest.skip("256 layers through the Triton interpreter is too slow; runs on CUDA")
    z0, W, bias = make_chain(256, 8, (4,), residual=False, device=device, seed=11)
    res = newton_linear_pointwise(z0.float(), W.float(), bias.float(), activation="tanh", tol=1e-6, max_iters=30,
                                  impl=impl)
    assert_solved(res, sequential(z0, W, bias, "tanh", False), torch.float32, max_iters=10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_iterate_in_float32(dtype, impl, device):
    skip_unless_runnable(impl, device)
    z0, W, bias = make_chain(4, 3, (1,), residual=True, device=device, seed=2)
    z0, W, bias = z0.to(dtype), W.to(dtype), bias.to(dtype)
    res = newton_linear_pointwise(z0, W, bias, activation="silu", residual=True, tol=1e-6, max_iters=5, impl=impl)
    assert_solved(res, sequential(z0, W, bias, "silu", True), dtype)


@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["unbatched", "2x3"])
def test_batch_shapes_and_no_bias(batch):
    z0, W, _ = make_chain(9, 4, batch, residual=False, bias=False)
    res = newton_linear_pointwise(z0, W, None, activation="sigmoid", tol=1e-12, max_iters=9, impl="torch")
    assert res.traj.shape == (9, *batch, 4)
    assert_solved(res, sequential(z0, W, None, "sigmoid", False), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_not_converged_is_reported(impl, device):
    """Too few iterations: reported as not converged with a residual history; no fallback here."""
    skip_unless_runnable(impl, device)
    z0, W, bias = make_chain(5, 3, (1,), residual=False, device=device)
    res = newton_linear_pointwise(z0, W * 5, bias, activation="tanh", tol=1e-12, max_iters=2, impl=impl)
    assert not res.converged and res.iterations == 2 and len(res.residuals) == 3
    res0 = newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-12, max_iters=0, impl=impl)
    assert not res0.converged and res0.iterations == 0 and len(res0.residuals) == 1
    assert torch.equal(res0.traj, z0.expand(5, *z0.shape))  # the initial guess


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_finite_stops_early(impl, device):
    skip_unless_runnable(impl, device)
    z0, W, bias = make_chain(5, 3, (1,), residual=False, device=device)
    W[3, 0, 0] = float("nan")
    res = newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-12, max_iters=6, impl=impl)
    assert not res.converged and res.iterations == 0 and res.residual == float("inf")


def test_bad_arguments_raise():
    z0, W, bias = make_chain(4, 3, (2,), residual=False)
    with pytest.raises(ValueError, match=r"W must have shape \(L, w, w\)"):
        newton_linear_pointwise(z0, W[:, :2], bias, activation="tanh", tol=1e-6, max_iters=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(L, w\)"):
        newton_linear_pointwise(z0, W, bias[:2], activation="tanh", tol=1e-6, max_iters=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        newton_linear_pointwise(z0, W, bias, activation="softplus", tol=1e-6, max_iters=3)
    with pytest.raises(ValueError, match="z0 must be a floating tensor"):
        newton_linear_pointwise(z0.long(), W, bias, activation="tanh", tol=1e-6, max_iters=3)
    with pytest.raises(ValueError, match="impl must be"):
        newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-6, max_iters=3, impl="cuda")


def shrinking_chain():
    """32 bias-free tanh layers of width 16 whose activations shrink from 0.5 to about 1e-17 (float64)."""
    z0, W, _ = make_chain(32, 16, (2,), residual=False, bias=False, seed=3)
    return z0, W


def per_step_error(traj: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(L,): each step's max error relative to that step's own size in the float64 reference."""
    return (traj.double().cpu() - ref).abs().amax((1, 2)) / ref.abs().amax((1, 2))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shrinking_chain_is_not_converged_while_small_steps_are_wrong(impl):
    """The step residual is relative to each step's size: a guess whose tiny steps are still wrong, though its
    residual is far under tol relative to the chain's largest step, is not reported converged."""
    skip_unless_runnable(impl, "cpu")
    z0, W = shrinking_chain()
    ref = sequential(z0, W, None, "tanh", False)  # (32, 2, 16)
    assert ref.abs().amax((1, 2))[-1] < 1e-15 < 0.1 < ref.abs().amax((1, 2))[0]
    tol = 1e-10
    res = newton_linear_pointwise(z0, W, None, activation="tanh", tol=tol, max_iters=8, impl=impl)
    assert res.converged and res.residual <= tol
    assert all(r > tol for r in res.residuals[:-1])
    assert per_step_error(res.traj, ref).max() < 1e-9  # every step right at its own scale
    # One iteration fewer: the old global rule (max|r| <= tol * max|f|) would have accepted this guess,
    # whose last steps are off by more than their own size; the step residual refuses it.
    early = newton_linear_pointwise(z0, W, None, activation="tanh", tol=tol, max_iters=res.iterations - 1, impl=impl)
    assert not early.converged and early.residual > tol
    prev = torch.cat([z0[None], early.traj[:-1].double()])
    f = torch.tanh(torch.einsum("lij,lbj->lbi", W, prev))
    assert (early.traj - f).abs().max() <= tol * f.abs().max()  # the old rule's test passes
    assert per_step_error(early.traj, ref).max() > 1.0
    # The trajectory, iteration by iteration, is the same on both paths; so are the residual histories.
    ref_res = newton_linear_pointwise(z0, W, None, activation="tanh", tol=tol, max_iters=8, impl="torch")
    assert res.iterations == ref_res.iterations
    assert res.residuals == pytest.approx(ref_res.residuals, rel=1e-6, abs=1e-14)


@pytest.mark.parametrize("chunk", [None, 5])
def test_triton_status_is_read_in_few_transfers(chunk, monkeypatch):
    """The host reads the done flag and the residual history in one transfer per check: 2 for 5 iterations."""
    skip_unless_runnable("triton", "cpu")
    z0, W, bias = make_chain(12, 4, (2,), residual=False, seed=1)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    Z, it, conv, residuals = fused_newton_launch(z0, W, bias, "tanh", False, 1e-11, 20, tiny(z0.dtype), chunk=chunk)
    monkeypatch.undo()
    ref = newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-11, max_iters=20, impl="torch")
    assert conv and it == ref.iterations and 4 <= it <= 7
    assert len(reads) == 2
    assert residuals == pytest.approx(ref.residuals, rel=1e-6, abs=1e-14)
    torch.testing.assert_close(Z, ref.traj, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("w,residual", [(33, False), (48, True), (64, False)])
def test_triton_chunked_newton_at_widths_over_32(w, residual):
    """The fused Newton cuts chains into chunks at every width up to 64 (summaries in their own kernel)."""
    skip_unless_runnable("triton", "cpu")
    z0, W, bias = make_chain(7, w, (2,), residual=residual, seed=w)
    Z, it, conv, residuals = fused_newton_launch(z0, W, bias, "tanh", residual, 1e-11, 7, tiny(z0.dtype), chunk=3,
                                                 check_every=2)
    assert conv and len(residuals) == it + 1
    torch.testing.assert_close(Z, sequential(z0, W, bias, "tanh", residual), atol=1e-9, rtol=1e-9)


def test_triton_on_a_cpu_state_without_the_interpreter_is_a_clear_error(monkeypatch):
    """kernels="triton" with a CPU state and no interpreter: Triton's own error was "0 active drivers ([])" (the
    solve falls back to sequential evaluation with that reason); it names the option and what it needs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z0, W, bias = torch.randn(2, 3), torch.randn(4, 3, 3) * 0.3, torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="kernels='triton' needs CUDA tensors or TRITON_INTERPRET=1.*on cpu"):
        newton_linear_pointwise(z0, W, bias, activation="tanh", tol=1e-6, max_iters=6, impl="triton")
