"""The Newton / Picard driver (pcr_compile/solver/newton.py) on hand-written chains, without the compiler."""

import math

import pytest
import torch

from pcr_compile.solver import newton


def tanh_mlp(L, w, B, gain=0.9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, w, w, generator=g, dtype=torch.float64) * gain / math.sqrt(w)
    b = torch.randn(L, w, generator=g, dtype=torch.float64) * 0.1
    z0 = torch.randn(B, w, generator=g, dtype=torch.float64)
    W, b, z0 = W.to(dtype), b.to(dtype), z0.to(dtype)

    def evaluate(start, Zprev, need_A):  # all steps at once: F (n, B, w), J (n, B, w, w)
        n = Zprev.shape[0]
        a = torch.einsum("nbi,noi->nbo", Zprev, W[start:start + n]) + b[start:start + n, None]
        F = torch.tanh(a)
        J = (1 - F * F).unsqueeze(-1) * W[start:start + n, None] if need_A else None
        return F, J

    def step(l, z):
        return torch.tanh(z @ W[l].T + b[l])

    def sequential():
        z, out = z0, []
        for l in range(L):
            z = step(l, z)
            out.append(z)
        return torch.stack(out)

    return z0, evaluate, step, sequential


def test_1024_layer_tanh_mlp_converges_in_at_most_10_iterations():
    z0, evaluate, step, sequential = tanh_mlp(L=1024, w=8, B=16)
    Z, stats = newton.newton_forward(z0, 1024, evaluate, step, structure="dense", tol=newton.default_tol(z0.dtype),
                                     max_iters=50, solve_dtype=torch.float32)
    assert stats.converged and not stats.fell_back and stats.iterations <= 10
    torch.testing.assert_close(Z, sequential(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "identity", "zero"])
@pytest.mark.parametrize("window", [0, 7])
def test_every_structure_reaches_the_sequential_result(structure, window):
    z0, evaluate, step, sequential = tanh_mlp(L=40, w=5, B=3, dtype=torch.float64)

    def ev(start, Zprev, need_A):
        F, J = evaluate(start, Zprev, need_A and structure in ("dense", "diagonal"))
        return F, (J.diagonal(dim1=-2, dim2=-1) if structure == "diagonal" and J is not None else J)

    Z, stats = newton.newton_forward(z0, 40, ev, step, structure=structure, tol=1e-12, max_iters=60,
                                     solve_dtype=torch.float64, window=window)
    assert stats.converged
    torch.testing.assert_close(Z, sequential(), rtol=1e-10, atol=1e-10)


def test_max_iters_falls_back_from_the_converged_prefix():
    z0, evaluate, step, sequential = tanh_mlp(L=64, w=6, B=2, gain=4.0, dtype=torch.float64)
    calls = []

    def counting_step(l, z):
        calls.append(l)
        return step(l, z)

    Z, stats = newton.newton_forward(z0, 64, evaluate, counting_step, structure="identity", tol=1e-12,
                                     max_iters=3, solve_dtype=torch.float64)
    assert stats.fell_back and not stats.converged and "max_iters" in stats.reason
    assert calls and calls[0] == stats.prefix >= 3  # each update fixes at least one more step
    torch.testing.assert_close(Z, sequential(), rtol=1e-10, atol=1e-10)


def test_adjoint_solve_is_exact_with_any_preconditioner():
    L, B, w = 30, 2, 4
    g = torch.Generator().manual_seed(3)
    J = torch.randn(L, B, w, w, generator=g, dtype=torch.float64) * 0.4
    cot = torch.randn(L, B, w, generator=g, dtype=torch.float64)

    def vjp(lam):  # U[s] = J_s^T lam[s]
        return (J.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1)

    expected = torch.empty_like(cot)
    expected[-1] = cot[-1]
    for m in range(L - 2, -1, -1):
        expected[m] = J[m + 1].T @ expected[m + 1] if B == 0 else (J[m + 1].transpose(-1, -2)
                                                                    @ expected[m + 1].unsqueeze(-1)).squeeze(-1)
        expected[m] += cot[m]
    for structure, A in [("dense", J), ("diagonal", J.diagonal(dim1=-2, dim2=-1)), ("identity", None)]:
        lam, stats = newton.adjoint_solve(cot, vjp, A, None, structure=structure, tol=1e-12, max_iters=60)
        assert stats.converged, structure
        torch.testing.assert_close(lam, expected, rtol=1e-10, atol=1e-10)
    _, stats = newton.adjoint_solve(cot, vjp, J, None, structure="dense", tol=1e-12, max_iters=60)
    assert stats.iterations == 0  # the exact Jacobian: the first solve passes the check

    def step_vjp(s, v):
        return (J[s].transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)

    lam, stats = newton.adjoint_solve(cot, vjp, None, step_vjp, structure="identity", tol=1e-12, max_iters=4)
    assert stats.fell_back and stats.prefix >= 4  # the converged suffix is kept, the rest done in order
    torch.testing.assert_close(lam, expected, rtol=1e-10, atol=1e-10)
