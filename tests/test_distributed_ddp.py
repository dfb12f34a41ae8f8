"""DDP: `torch.compile(DDP(model), backend="deeppcr")` keeps one chain op per chain, with eager DDP's gradients.

Two gloo ranks on loopback, each on its own data; a 12-layer width-128 float64 MLP (1.6 MB of parameters)
under 1 MB buckets, which Dynamo's DDP optimizer cuts into pieces of 8 and 4 layers (the second under
`min_chain_length`, so left sequential)."""

import copy

import pytest
import torch
import torch.distributed as dist
from dist_helpers import requires_gloo, run_ranks

pytestmark = requires_gloo

LAYERS, WIDTH, BATCH = 12, 128, 4
OPTS = {"mode": "parallel", "strict": True}


def _ddp_worker(rank: int, world: int, optimize_ddp) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pcr_compile
    from pcr_compile.distributed import clear_ddp_reports, ddp_reports
    from pcr_compile.models import DeepMLP

    torch._dynamo.config.optimize_ddp = optimize_ddp
    torch.manual_seed(0)
    base = DeepMLP(LAYERS, WIDTH, gain=0.8).double()
    eager = DDP(copy.deepcopy(base), bucket_cap_mb=1)
    model = DDP(copy.deepcopy(base), bucket_cap_mb=1)
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
        if optimize_ddp is False:
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
    if optimize_ddp is False:
        assert reports and reports[0].mode == "merged" and reports[0].cuts, reports
        assert len(reports[0].buckets) > 1 and len(reports[0].merged) < len(reports[0].buckets), reports
    else:
        assert reports and all(r.mode == "pieces" and "optimize_ddp = False" in r.note for r in reports), reports


@pytest.mark.parametrize("optimize_ddp", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["chain-aware", "dynamo-split"])
def test_ddp_two_ranks(optimize_ddp):
    run_ranks(_ddp_worker, 2, optimize_ddp)


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
