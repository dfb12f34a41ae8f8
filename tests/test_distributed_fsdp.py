"""FSDP: blocks that gather their parameters per layer hold collectives; their chains are declined, named.

The in-process test traces what FSDP2's hooks put in a graph when traced (an all-gather of every layer's
weight shard through functional collectives) on a one-rank gloo group; the spawned test runs FSDP2
(`fully_shard` per layer) and FSDP1 on 2 ranks against eager FSDP."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_helpers import free_port, requires_gloo, run_ranks

pytestmark = requires_gloo


class GatheredMLP(nn.Module):
    """`layers` x tanh(Linear), each weight all-gathered from its shards before use (FSDP2's pattern)."""

    def __init__(self, layers=12, width=8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        from torch.distributed._functional_collectives import all_gather_tensor

        for lin in self.layers:
            w = all_gather_tensor(lin.weight, 0, dist.group.WORLD)
            x = torch.tanh(x @ w.T + lin.bias)
        return x


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gathered_layers_declined_naming_the_collective(one_rank_group):
    import pcr_compile

    model = GatheredMLP().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    report = pcr_compile.explain(model, x, options={"mode": "parallel"})
    assert not report.chains, report
    reasons = [d.reason for d in report.declined]
    assert any("_c10d_functional.all_gather_into_tensor" in r and "calls the collective" in r
               for r in reasons), reasons
    fast = torch.compile(copy.deepcopy(model), backend="deeppcr", options={"mode": "parallel", "strict": True})
    out = fast(x)
    out.square().sum().backward()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for p, q in zip(fast.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def _fsdp_worker(rank, world, which):
    from pcr_compile.models import DeepMLP

    torch.manual_seed(0)
    base = DeepMLP(16, 8, gain=0.8).double()

    def wrap(m):
        if which == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in m.layers:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            return fully_shard(m)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # FSDP1 on a CPU-only gloo group needs device_id=cpu (without it, it looks for an accelerator).
        return FSDP(m, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=True,
                    device_id=torch.device("cpu"))

    eager, model = wrap(copy.deepcopy(base)), wrap(copy.deepcopy(base))
    fast = torch.compile(model, backend="deeppcr", options={"mode": "parallel", "strict": True})
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    out, ref = fast(x), eager(x)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for p, q in zip(model.parameters(), eager.parameters()):
        g, h = p.grad, q.grad
        g, h = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (g, h))
        torch.testing.assert_close(g, h, msg=lambda m: f"rank {rank} {which}: {m}")


@pytest.mark.parametrize("which", ["fsdp2", "fsdp1"])
def test_fsdp_two_ranks_equal_eager(which):
    run_ranks(_fsdp_worker, 2, which)
