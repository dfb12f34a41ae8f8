"""Model and block shapes from a generality sweep (ALBERT-style sharing, gated blocks, stochastic depth, flows):
each against eager, values and gradients."""

import pytest
import torch
import torch.nn as nn
from helpers import PARALLEL

import pcr_compile

W, B, L = 6, 4, 10


class DetachedGates(nn.Module):
    """Residual blocks gated by a value computed `.detach()`-ed: per layer (`form="layers"`), by one shared gate
    (`"shared"`), or by rows of a stacked parameter (`"stacked"`); or by a comparison with a threshold parameter
    (`"compare"`). No gradient reaches the gates' parameters."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = nn.ModuleList(nn.Linear(W, W) for _ in range(L))
        self.g = nn.ModuleList(nn.Linear(W, W) for _ in range(L))
        self.shared = nn.Linear(W, W)
        self.G = nn.Parameter(torch.randn(L, W, W) * 0.3)
        self.thresholds = nn.Parameter(torch.randn(L, W) * 0.1)

    def forward(self, x):
        for i, (a, g) in enumerate(zip(self.a, self.g)):
            if self.form == "layers":
                gate = torch.sigmoid(g(x)).detach()
            elif self.form == "shared":
                gate = torch.sigmoid(self.shared(x)).detach()
            elif self.form == "stacked":
                gate = torch.sigmoid(x @ self.G[i]).detach()
            else:
                gate = (x > self.thresholds[i]).to(x.dtype)
            x = x + gate * torch.tanh(a(x))
        return x


@pytest.mark.parametrize("form", ["layers", "shared", "stacked", "compare"])
def test_parameters_no_state_reaches_keep_none_gradients(form):
    """Parameters read only through a `detach` or a comparison have no gradient in eager (None: an optimizer skips
    them). The chain op returned zeros for them, so weight decay and momentum still moved them."""
    torch.manual_seed(0)
    model = DetachedGates(form).double()
    x = torch.randn(B, W, dtype=torch.float64, requires_grad=True)
    ref = model(x)
    ref.pow(2).sum().backward()
    want = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    want_x = x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None
    with pcr_compile.record_solves() as solves:
        out = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        out.pow(2).sum().backward()
    assert [(s.direction, s.converged) for s in solves] == [("forward", True), ("backward", True)]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-8, atol=1e-9)
    for name, p in model.named_parameters():
        if want[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-8, atol=1e-9, msg=name)
    assert any(g is None for g in want.values()) and any(g is not None for g in want.values())

