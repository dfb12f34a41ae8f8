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
    want, want_x = _eager_grads(model, x, ref)
    with pcr_compile.record_solves() as solves:
        out = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        out.pow(2).sum().backward()
    assert [(s.direction, s.converged) for s in solves] == [("forward", True), ("backward", True)]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-8, atol=1e-9)
    _assert_grads_as_eager(model, want)
    assert any(g is None for g in want.values()) and any(g is not None for g in want.values())


class NoGradGates(nn.Module):
    """Gated residual blocks whose gate is computed `with torch.no_grad():` (`in_place=True`: the region also
    writes a parameter, as an optimizer step would, which no rewrite may move out of its region)."""

    def __init__(self, in_place=False):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(W, W) for _ in range(L))
        self.g = nn.ModuleList(nn.Linear(W, W) for _ in range(L))
        self.in_place = in_place

    def forward(self, x):
        for a, g in zip(self.a, self.g):
            with torch.no_grad():
                gate = torch.sigmoid(g(x))
                if self.in_place:
                    g.bias.mul_(1.0)
            x = x + gate * torch.tanh(a(x))
        return x, gate


def test_a_no_grad_region_inside_a_step_is_a_chain_with_eager_gradients():
    """`torch.no_grad()` inside a block reached the finder as `_set_grad_enabled` markers, side effects that
    declined every block; the region is now its ops with a `detach` of each value read after it
    (passes/grad_regions.py): the same values, no gradient through the gate (None for its parameters)."""
    torch.manual_seed(0)
    model = NoGradGates().double()
    x = torch.randn(B, W, dtype=torch.float64, requires_grad=True)
    report = pcr_compile.explain(model, x, options=PARALLEL)
    assert [(c.length, c.decision) for c in report.chains] == [(L, "parallel")], report
    ref, ref_gate = model(x)
    assert not ref_gate.requires_grad
    want, want_x = _eager_grads(model, x, ref)
    with pcr_compile.record_solves() as solves:
        out, gate = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        out.pow(2).sum().backward()
    assert [(s.direction, s.converged) for s in solves] == [("forward", True), ("backward", True)]
    assert not gate.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gate, ref_gate, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-8, atol=1e-9)
    _assert_grads_as_eager(model, want)


def test_a_no_grad_region_that_writes_in_place_is_left_alone():
    report = pcr_compile.explain(NoGradGates(in_place=True), torch.randn(B, W), options=PARALLEL)
    assert not report.chains and report.declined, report
    assert "_set_grad_enabled" in report.declined[0].reason or "in-place" in report.declined[0].reason, report


def _assert_grads_as_eager(model, want):
    """Each parameter's gradient is eager's: None where eager's is None, else equal."""
    for name, p in model.named_parameters():
        if want[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-8, atol=1e-9, msg=name)


def _eager_grads(model, x, ref):
    """Eager's parameter gradients (None where eager's are None) and input gradient of `ref.pow(2).sum()`, with
    the model's and the input's gradients then cleared."""
    ref.pow(2).sum().backward()
    want = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    want_x = x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None
    return want, want_x
