"""pcr_compile/cost.py: decisions per chain, including mode="auto" on a CUDA device (a pure function of the
match, the options and the device, so it runs here with a fake CUDA device)."""

import torch

from pcr_compile.cost import GPU_MODEL, decide
from pcr_compile.models import DeepMLP, ResidualMLP
from pcr_compile.options import Options
from pcr_compile.passes.chains import find_chains

CUDA = torch.device("cuda")


def _match(model, x):
    """The chain Dynamo's graph of `model(x)` holds, as the backend sees it (with example values)."""
    [gm] = torch._dynamo.explain(model)(x).graphs
    [m] = find_chains(gm.graph, min_length=8).chains
    return m


def test_auto_on_cuda_solves_a_deep_narrow_chain_in_parallel():
    m = _match(DeepMLP(layers=128, width=16), torch.randn(16, 16))
    d = decide(m, Options(mode="auto"), CUDA)
    assert (d.decision, d.jacobian) == ("parallel", "dense")
    par, seq, _ = GPU_MODEL.predict(m, "dense")
    assert seq >= GPU_MODEL.speedup * par
    assert "launch-bound model" in d.reason and f"{GPU_MODEL.launch_us:g} us" in d.reason  # the rule and constants


def test_auto_on_cuda_keeps_short_chains_and_jacobi_sequential():
    short = _match(DeepMLP(layers=16, width=16), torch.randn(16, 16))
    d = decide(short, Options(mode="auto"), CUDA)
    assert d.decision == "sequential" and "predicted parallel" in d.reason
    deep = _match(DeepMLP(layers=128, width=16), torch.randn(16, 16))
    assert decide(deep, Options(mode="auto", jacobian="zero"), CUDA).decision == "sequential"
    assert decide(deep, Options(mode="auto"), torch.device("cpu")).decision == "sequential"
    assert decide(deep, Options(mode="parallel"), torch.device("cpu")).decision == "parallel"


def test_auto_on_cuda_never_predicts_a_gain_for_a_short_picard_stack():
    """12 residual blocks (as a 12-layer transformer stack, Picard): no gain predicted, so sequential."""
    m = _match(ResidualMLP(blocks=12, width=128), torch.randn(4, 128))
    d = decide(m, Options(mode="auto"), CUDA)
    assert d.jacobian == "identity" and d.decision == "sequential"
