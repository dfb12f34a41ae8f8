"""passes/structure.py: which templates are linear-pointwise, and which named activation the fused kernels
run. An activation whose arguments change its function (GELU's approximate="tanh") must not run as the
fused kernels' erf GELU: it is left unfused, and every variant matches eager through the Triton path."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pcr_compile
from pcr_compile.passes.structure import linear_pointwise


class Method(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return getattr(x, self.name)()


VARIANTS = {  # module -> the fused kernels' activation (None: not fused)
    "tanh": (nn.Tanh, "tanh"),
    "relu_inplace": (lambda: nn.ReLU(inplace=True), "relu"),
    "gelu": (nn.GELU, "gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), None),
    "sigmoid_method": (lambda: Method("sigmoid"), "sigmoid"),
    "silu": (nn.SiLU, "silu"),
    "softplus_beta": (lambda: nn.Softplus(beta=2.0), None),
}


def _template(act):
    def step(z, W, b):
        return (act(F.linear(z, W, b)),)

    return torch.fx.symbolic_trace(step)


@pytest.mark.parametrize("act, expected", [
    (lambda a: F.gelu(a), "gelu"), (lambda a: F.gelu(a, approximate="none"), "gelu"),
    (lambda a: F.gelu(a, approximate="tanh"), None),
    (torch.tanh, "tanh"), (lambda a: F.silu(a, inplace=False), "silu"), (lambda a: F.softplus(a, beta=2.0), None),
    (lambda a: F.leaky_relu(a, 0.2), None),
])
def test_named_activation_respects_arguments(act, expected):
    lp = linear_pointwise(_template(act), 1, 2)
    assert lp is not None and lp.activation == expected


def test_not_linear_pointwise():
    def step(z, W, b):
        return (torch.tanh(F.linear(z, W, b)) * z,)  # reads the state twice

    assert linear_pointwise(torch.fx.symbolic_trace(step), 1, 2) is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_fused_activation_variant_matches_eager_through_the_triton_path(variant):
    make, fused_as = VARIANTS[variant]
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(6, 6), make()]
    model = nn.Sequential(*layers)
    x = torch.randn(3, 6)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="deeppcr",
                                 options={"mode": "parallel", "kernels": "triton", "strict": True})
        with pcr_compile.record_solves() as recs:
            y = compiled(x)
    [rec] = recs
    assert (rec.reason == "fused") == (fused_as is not None), rec
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-6)
