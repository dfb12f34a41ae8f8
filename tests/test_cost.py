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


class _ScaledResidual(torch.nn.Module):
    """diffusers' ResnetBlock2D ends `(input + hidden) / output_scale_factor`: a scaled residual sum."""

    def __init__(self, blocks, width, scale, op):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
        self.scale, self.op = scale, op

    def forward(self, x):
        for layer in self.layers:
            x = (x + torch.tanh(layer(x))) / self.scale if self.op == "div" else (x + torch.tanh(layer(x))) * self.scale
        return x


def test_scaled_residual_sum_is_residual():
    for op, scale in (("div", 1.0), ("div", 2 ** 0.5), ("mul", 0.5)):
        m = _match(_ScaledResidual(12, 128, scale, op), torch.randn(4, 128))
        assert decide(m, Options(mode="parallel"), torch.device("cpu")).jacobian == "identity", (op, scale)
    # a stack without a residual sum stays Jacobi at this width
    plain = _match(DeepMLP(layers=12, width=128), torch.randn(4, 128))
    assert decide(plain, Options(mode="parallel"), torch.device("cpu")).jacobian == "zero"
