"""DDP: `torch.compile(DDP(model), backend="deeppcr")` keeps one chain op per chain, with eager DDP's gradients.

Two gloo ranks on loopback, each on its own data; a 12-layer width-128 float64 MLP (1.6 MB of parameters)
under 1 MB buckets, which Dynamo's DDP optimizer cuts into pieces of 8 and 4 layers (the second under
`min_chain_length`, so left sequential). With the default `optimize_ddp = True` the backend's hook hands it
the whole graph and the chain stays one op; with the hook off (`PCR_COMPILE_DDP_HOOK=0`) the pieces are
what reaches the backend."""

import copy

import pytest
import torch
import torch.distributed as dist
from dist_helpers import requires_gloo, run_ranks

pytestmark = requires_gloo

LAYERS, WIDTH, BATCH = 12, 128, 4
OPTS = {"mode": "parallel", "strict": True}


def _ddp_worker(rank: int, world: int, optimize_ddp, hook: bool, cap_mb: float) -> None:
    import os

    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["PCR_COMPILE_DDP_HOOK"] = "1" if hook else "0"  # read when the backend is first imported

    import pcr_compile
    from pcr_compile.distributed import clear_ddp_reports, ddp_reports
    from pcr_compile.models import DeepMLP

    torch._dynamo.config.optimize_ddp = optimize_ddp
    torch.manual_seed(0)
    base = DeepMLP(LAYERS, WIDTH, gain=0.8).double()
    eager = DDP(copy.deepcopy(base), bucket_cap_mb=cap_mb)
    model = DDP(copy.deepcopy(base), bucket_cap_mb=cap_mb)
    fast = torch.compile(model, backend="deeppcr", options=OPTS)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_f = torch.optim.SGD(model.parameters(), lr=0.05)
    clear_ddp_reports()
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(BATCH, WIDTH, dtype=torch.float64, generator=g)
        with pcr_compile.record_solves() as solves:
            fast(x).square().sum().backward()
        eager(x).square().sum().backward()
        forward = [s for s in solves if s.direction == "forward"]
        whole = optimize_ddp is False or hook
        if whole:
            assert len(forward) == 1 and forward[0].length == LAYERS, [s.length for s in forward]
        else:
            assert [s.length for s in forward] == [8], [s.length for s in forward]  # the 4-layer piece: too short
        for (name, pe), pf in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-7, atol=1e-9, msg=f"rank {rank} step {step} {name}")
        opt_e.step(), opt_f.step(), opt_e.zero_grad(), opt_f.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks' parameters differ after 3 steps"
    reports = ddp_reports()
    if whole:
        assert reports and reports[0].mode == "merged" and reports[0].cuts, reports
        assert len(reports[0].buckets) >= (6 if cap_mb < 1 else 2), reports  # 131 kB a layer
        assert len(reports[0].merged) < len(reports[0].buckets), reports
    else:
        assert reports and all(r.mode == "pieces" and "optimize_ddp = False" in r.note for r in reports), reports


@pytest.mark.parametrize("optimize_ddp,hook,cap_mb", [(True, True, 0.25), (False, True, 1),
                                                      pytest.param(True, False, 1, marks=pytest.mark.slow)],
                         ids=["default-many-buckets", "optimize_ddp-off", "hook-off"])
def test_ddp_two_ranks(optimize_ddp, hook, cap_mb):
    run_ranks(_ddp_worker, 2, optimize_ddp, hook, cap_mb)


def test_ddp_hook_defers_only_for_deeppcr():
    """Installed by importing the backend; torch's own split for any other backend, the whole graph for ours."""
    import torch._dynamo.backends.distributed as dist_backend

    import pcr_compile.backend  # noqa: F401  (installs the hook)
    from pcr_compile.distributed.ddp import DeferringDDPOptimizer, _is_deeppcr

    assert dist_backend.DDPOptimizer is DeferringDDPOptimizer
    seen = []

    def other(gm, inputs):
        seen.append(len([n for n in gm.graph.nodes if n.target is torch._C._nn.linear]))
        return gm.forward

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    graphs = []
    torch.compile(model, backend=lambda gm, inputs: graphs.append((gm, inputs)) or gm.forward)(torch.randn(2, 256))
    gm, inputs = graphs[0]
    DeferringDDPOptimizer(bucket_bytes_cap=300_000, backend_compile_fn=other,
                          first_bucket_cap=300_000).compile_fn(gm, inputs)
    assert seen and max(seen) < 4, seen  # torch's split: pieces of the 4 layers
    from torch._dynamo.repro.after_dynamo import wrap_backend_debug

    # What Dynamo hands the DDP optimizer for torch.compile(..., backend="deeppcr", options=...)
    wrapped = wrap_backend_debug(torch._TorchCompileWrapper("deeppcr", None, {"mode": "parallel"}, None), "deeppcr")
    assert _is_deeppcr(wrapped)
    assert not _is_deeppcr(other)


def test_explain_ddp_reports_the_cut_and_the_merge():
    from pcr_compile.distributed import explain_ddp
    from pcr_compile.models import DeepMLP

    model = DeepMLP(LAYERS, WIDTH).double()
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    (rep,) = explain_ddp(model, x, bucket_cap_mb=1, options=OPTS)
    assert rep.mode == "merged" and len(rep.buckets) == 2 and len(rep.merged) == 1, rep
    assert len(rep.cuts) == 1 and rep.cuts[0][2] == 2 and sum(rep.merged) == sum(rep.buckets), rep
    # At the default 25 MB the first bucket (the last layers) is still DDP's 1 MB first bucket: one cut.
    (wide,) = explain_ddp(model, x, bucket_cap_mb=25, options=OPTS)
    assert len(wide.buckets) == 2 and len(wide.merged) == 1, wide


def _other_backend_worker(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pcr_compile.backend  # noqa: F401  (installs the hook)
    from pcr_compile.models import DeepMLP

    torch.manual_seed(0)
    base = DeepMLP(LAYERS, WIDTH, gain=0.8).double()
    eager, model = DDP(copy.deepcopy(base), bucket_cap_mb=1), DDP(copy.deepcopy(base), bucket_cap_mb=1)
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(BATCH, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    torch.compile(model, backend=counting)(x).square().sum().backward()
    eager(x).square().sum().backward()
    assert len(graphs) == 2, len(graphs)  # torch's own split at the 1 MB bucket boundary, as without the hook
    for pe, pf in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad)


def test_ddp_hook_leaves_other_backends_split_as_torch_does():
    run_ranks(_other_backend_worker, 2)
