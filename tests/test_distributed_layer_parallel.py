"""Layer-parallel chains: a chain of L steps split over 2 / 4 gloo ranks equals the single-device chain.

Reference: the same chain evaluated step by step by eager PyTorch in float64 with autograd (values, every
rank's slice of the parameter gradients, and the input's gradient)."""

import pytest
import torch
from dist_helpers import requires_gloo, run_ranks

pytestmark = requires_gloo


def _step(p, z):
    W, b = p
    return torch.tanh(z @ W.T + b)


def _chain(L, w, gain, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, w, w, dtype=torch.float64, generator=g) * gain / w ** 0.5
    b = torch.randn(L, w, dtype=torch.float64, generator=g) * 0.1
    z0 = torch.randn(3, w, dtype=torch.float64, generator=g)
    return W, b, z0


def _eager(W, b, z0):
    W, b, z0 = (t.clone().requires_grad_() for t in (W, b, z0))
    z = z0
    for l in range(W.shape[0]):
        z = _step((W[l], b[l]), z)
    (z * torch.linspace(-1, 1, z.shape[-1], dtype=z.dtype)).sum().backward()
    return z.detach(), W.grad, b.grad, z0.grad


def _lp_worker(rank, world, L, w, gain, max_iters, expect_fallback, dtype=torch.float64):
    from pcr_compile.distributed import layer_parallel as lp

    W, b, z0 = _chain(L, w, gain)
    ref_z, ref_gW, ref_gb, ref_gz0 = _eager(W, b, z0)  # float64
    sizes = lp.split_sizes(L, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    Wl, bl = W[lo:hi].to(dtype).requires_grad_(), b[lo:hi].to(dtype).requires_grad_()
    z0l = z0.to(dtype).requires_grad_()
    # float64: rounding level; float32 (tol 1e-6 a step): L steps of per-step perturbations at most
    bound = 1e-7 if dtype == torch.float64 else 1e-4
    lp.clear_records()
    z = lp.layer_parallel(_step, (Wl, bl), z0l, max_iters=max_iters)
    (z * torch.linspace(-1, 1, w, dtype=z.dtype)).sum().backward()
    for what, got, ref in (("z_L", z, ref_z), ("dW", Wl.grad, ref_gW[lo:hi]), ("db", bl.grad, ref_gb[lo:hi]),
                           ("dz0", z0l.grad, ref_gz0)):
        err = float((got.double() - ref).abs().max() / ref.abs().max())  # relative to the largest entry
        assert err < bound, f"rank {rank}: {what} off by {err:.2e} (relative to its largest entry)"
    fwd, bwd = lp.records()
    assert fwd.fell_back == expect_fallback and fwd.converged != expect_fallback, fwd
    assert bwd.converged, bwd
    if not expect_fallback:
        # one all-gather per iteration, plus the step counts once and z_L's broadcast
        assert fwd.collectives == fwd.iterations + 1 + 2, fwd


def _compiled_worker(rank, world, L, w):
    """`options={"process_group": "world"}`: the compiled model's chain solved over the ranks."""
    import pcr_compile
    from pcr_compile.distributed import layer_parallel as lp
    from pcr_compile.models import DeepMLP

    torch.manual_seed(0)
    model = DeepMLP(L, w, gain=0.9).double()
    x = torch.randn(3, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = torch.compile(model, backend="deeppcr",
                         options={"mode": "parallel", "jacobian": "dense", "process_group": "world", "strict": True})
    lp.clear_records()
    with pcr_compile.record_solves() as solves:
        out = fast(x)
        out.square().sum().backward()
    assert [s.jacobian for s in solves] == ["layer-parallel", "layer-parallel"], solves
    assert [(r.direction, r.world, r.converged) for r in lp.records()] == [("forward", world, True),
                                                                          ("backward", world, True)]
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-7, f"rank {rank}: output"
    scale = max(float(g.abs().max()) for g in ref_grads)
    err = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), ref_grads)) / scale
    assert err < 1e-7, f"rank {rank}: gradients off by {err:.2e}"


def _cases_worker(rank, world, cases):
    for case in cases:
        if case[0] == "compiled":
            _compiled_worker(rank, world, *case[1:])
        else:
            _lp_worker(rank, world, *case)


SOLVE_256 = (256, 8, 0.9, 50, False)  # L, width, gain, max_iters, expect_fallback
# 2 iterations cannot converge 61 expansive steps (the residual grows 3 -> 3e5): every rank finishes
# sequentially, in order, from the accepted prefix; the split is uneven (31 + 30 steps).
DIVERGING_61 = (61, 6, 2.5, 2, True)
SOLVE_256_F32 = (256, 8, 0.9, 50, False, torch.float32)  # its adjoint needs the refinement to pass the rule


def test_layer_parallel_two_ranks():
    """One spawn for the 2-rank cases (a process start costs ~10 s here)."""
    run_ranks(_cases_worker, 2, [SOLVE_256, DIVERGING_61, SOLVE_256_F32])


@pytest.mark.slow
def test_layer_parallel_option_two_ranks():
    """The `process_group` option on a compiled DeepMLP (slow: Inductor's compile on every rank, ~15 s)."""
    run_ranks(_cases_worker, 2, [("compiled", 24, 8)])


@pytest.mark.slow
def test_layer_parallel_four_ranks():
    run_ranks(_cases_worker, 4, [SOLVE_256, (64, 6, 2.5, 2, True), ("compiled", 24, 8)])


def test_process_group_option_is_checked():
    from pcr_compile.distributed.chain_op import resolve
    from pcr_compile.options import Options

    with pytest.raises(ValueError, match="'process_group' must be None, 'world' or a name"):
        Options.parse({"process_group": 3})
    with pytest.raises(ValueError, match="'process_group' must be 'world' or a name registered"):
        resolve("no-such-group")
    assert Options.parse({"process_group": "world"}).process_group == "world"
