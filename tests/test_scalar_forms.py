"""Per-step numbers in arguments that take no tensor, or as keywords: lifted, through an equivalent form where
the op needs one (passes/chains/scalar_forms.py). Values and gradients against eager in float64; the forms
themselves against the ops at their ties (x = 0, x on a bound)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import PARALLEL, run_both
from torch.fx import Graph, GraphModule

import pcr_compile
from pcr_compile.passes.chains import scalar_forms

L = 10
STEPS = {
    "clamp-kw": lambda h, x, t, i: torch.clamp(h, min=-t, max=t),
    "clamp-method-kw": lambda h, x, t, i: h.clamp(min=-t),
    "clamp-positional": lambda h, x, t, i: torch.clip(h, -t, t),
    "add-alpha": lambda h, x, t, i: torch.add(x, torch.tanh(h), alpha=t),
    "sub-alpha-method": lambda h, x, t, i: x.sub(torch.tanh(h), alpha=t),
    "add-number-alpha": lambda h, x, t, i: torch.add(torch.tanh(h), 0.5, alpha=t),
    "addcmul-value": lambda h, x, t, i: torch.addcmul(x, torch.tanh(h), torch.sigmoid(h), value=t),
    "lerp-weight": lambda h, x, t, i: torch.lerp(x, torch.tanh(h), t / 2),
    "leaky-relu-kw": lambda h, x, t, i: F.leaky_relu(h, negative_slope=0.02 * (i + 1)),
    "leaky-relu-positional": lambda h, x, t, i: F.leaky_relu(h, 0.02 * (i + 1)),
    "leaky-relu-module": lambda h, x, t, i: torch.nn.LeakyReLU(0.02 * (i + 1))(h),
    "elu-alpha": lambda h, x, t, i: F.elu(h, alpha=t),
    "celu-alpha": lambda h, x, t, i: F.celu(h, alpha=t),
    "hardtanh-bounds": lambda h, x, t, i: F.hardtanh(h, -t, t),
    "softplus-beta": lambda h, x, t, i: F.softplus(h, beta=4 * t),
    "softplus-threshold": lambda h, x, t, i: F.softplus(h, 2.0, t),  # the linear branch taken in some steps
    "softshrink-lambd": lambda h, x, t, i: F.softshrink(h, t),
    "hardshrink-lambd": lambda h, x, t, i: x + F.hardshrink(torch.tanh(h), t - 0.3),
    "threshold-both": lambda h, x, t, i: F.threshold(h, t - 0.5, -t),
    "masked-fill-value": lambda h, x, t, i: torch.tanh(h).masked_fill(h > 1.0, t),
    "clamp-min-method": lambda h, x, t, i: torch.tanh(h).clamp_min(0.5 - t),
    "clamp-max-function": lambda h, x, t, i: torch.clamp_max(torch.tanh(h), t),
    "rrelu-eval": lambda h, x, t, i: F.rrelu(h, t / 8, t / 4, training=False),
    "normalize-eps": lambda h, x, t, i: x + F.normalize(h, eps=t),
    "addmm-alpha": lambda h, x, t, i: torch.tanh(torch.addmm(x, torch.tanh(h), torch.ones(6, 6, dtype=h.dtype) / 6,
                                                             alpha=t)),
    "addmm-beta-alpha": lambda h, x, t, i: torch.tanh(x.addmm(torch.tanh(h), torch.eye(6, dtype=h.dtype), beta=t,
                                                               alpha=1 - t)),
    "baddbmm-alpha": lambda h, x, t, i: torch.tanh(torch.baddbmm(x[None], torch.tanh(h)[None],
                                                                 torch.eye(6, dtype=h.dtype)[None], alpha=t)[0]),
    "clamp-min": lambda h, x, t, i: torch.clamp_min(h, -t),
    "clamp-min-method-residual": lambda h, x, t, i: x + h.clamp_min(-t),
    "clamp-max-method": lambda h, x, t, i: x + h.clamp_max(t),
    # a per-layer rate outside training (linearly growing drop rates, in eval mode): the identity
    "dropout-eval": lambda h, x, t, i: x + F.dropout(torch.tanh(h), 0.05 * i, training=False),
    "dropout-module-eval": lambda h, x, t, i: x + torch.nn.Dropout(0.05 * i).eval()(torch.tanh(h)),
}


class PerStepNumbers(torch.nn.Module):
    def __init__(self, step, width=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(L))
        self.step = step

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = self.step(layer(x), x, 0.4 + 0.1 * i, i)
        return x


@pytest.mark.parametrize("name", list(STEPS))
def test_per_step_number_lifted(name):
    torch.manual_seed(0)
    model = PerStepNumbers(STEPS[name]).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y0, g0, y1, g1, solves = run_both(model, (x,), PARALLEL)
    fwd = [s for s in solves if s.direction == "forward"]
    assert [s.length for s in fwd] == [L] and all(s.converged and not s.fell_back for s in solves), solves
    torch.testing.assert_close(y1, y0, rtol=1e-7, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_float32_keeps_dtype():
    torch.manual_seed(0)
    model = PerStepNumbers(STEPS["leaky-relu-kw"])
    x = torch.randn(5, 6)
    with torch.no_grad():
        y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        ref = model(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_unknown_keyword_number_declined_with_op_name():
    model = PerStepNumbers(lambda h, x, t, i: torch.nan_to_num(torch.tanh(h), posinf=t))
    report = pcr_compile.explain(model, torch.randn(2, 6), options={"mode": "parallel"})
    assert not report.chains
    [declined] = [d for d in report.declined if "differs between steps" in d.reason]
    assert "nan_to_num" in declined.reason and "(`posinf`)" in declined.reason, declined.reason


FORMS = [
    (F.leaky_relu, {"negative_slope": 0.2}),
    (F.elu, {"alpha": 0.7}),
    (F.celu, {"alpha": 0.7}),
    (F.hardtanh, {"min_val": -0.5, "max_val": 0.25}),
    (F.softplus, {"beta": 2.0, "threshold": 0.5}),  # the tie at beta * x == threshold: x = 0.25
    (F.softplus, {"beta": 400.0, "threshold": 500.0}),  # x = 2: exp(800) would overflow (float64); linear
    (F.softshrink, {"lambd": 0.25}),
    (torch.hardshrink, {"lambd": 0.25}),
    (torch.threshold, {"threshold": 0.1, "value": -3.0}),
]


@pytest.mark.parametrize("op,kwargs", FORMS, ids=[f"{f.__name__}-{i}" for i, (f, _) in enumerate(FORMS)])
def test_form_matches_op_at_ties(op, kwargs):
    """The equivalent form, with the numbers as 0-d tensors, against the op: values and gradients, at 0 and on
    the bounds too (where a clamp's gradient and hardtanh's differ)."""
    g = Graph()
    x_ph = g.placeholder("x")
    numbers = {k: g.placeholder(k) for k in kwargs}
    node = g.call_function(op, (x_ph,), dict(numbers))
    out = scalar_forms.build(g, node, (x_ph,), dict(numbers))
    assert out is not None
    g.output(out)
    g.erase_node(node)
    form = GraphModule(torch.nn.Module(), g)
    x = torch.tensor([-2.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.3, 2.0, float("nan")], dtype=torch.float64,
                     requires_grad=True)
    want = op(x, **kwargs)
    got = form(x, **{k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()})
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # a NaN stays NaN
    # (aten's celu gradient carries alpha and 1 / alpha rounded: a few 1e-8; a wrong branch is off by O(1))
    finite = ~torch.isnan(x)  # (at a NaN the gradients are the ops' own conventions)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0][finite],
                               torch.autograd.grad(want.sum(), x)[0][finite], rtol=1e-7, atol=1e-12)


def test_inplace_variant_not_covered():
    g = Graph()
    x = g.placeholder("x")
    node = g.call_function(F.leaky_relu, (x, 0.1, True))
    assert scalar_forms.bind(node) is None and not scalar_forms.liftable(node, 1)


class SlicedInputLoop(torch.nn.Module):
    """A recurrence reading its step's input with the time dimension kept: `u[:, t:t + width]`."""

    def __init__(self, width=1, steps=L):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rec, self.width, self.steps = torch.nn.Linear(width, 4), torch.nn.Linear(4, 4), width, steps

    def forward(self, u, v):
        h = u.new_zeros(u.shape[0], 4)
        for t in range(self.steps):
            h = torch.tanh(self.rec(h) + self.inp(u[:, t:t + self.width]) * v[t:t + 1, 0:1])
        return h


def test_unit_slice_by_the_step_lifts_as_an_index():
    """`u[:, t:t + 1]` is rewritten `u[:, t, None]` (passes/slices.py), whose `t` lifts: one chain, eager's values
    and gradients; before, the slice's bounds differed per step and no candidate was even reported."""
    model = SlicedInputLoop().double()
    u = torch.randn(3, L, dtype=torch.float64, requires_grad=True)
    v = torch.randn(L, 2, dtype=torch.float64, requires_grad=True)
    [chain] = pcr_compile.explain(model, u, v, options=PARALLEL).chains
    assert chain.length == L and chain.kind == "recurrence"
    wrt = (u, v, *model.parameters())
    y0 = model(u, v)
    g0 = torch.autograd.grad(y0.pow(2).sum(), wrt)
    with pcr_compile.record_solves() as solves:
        y1 = torch.compile(model, backend="deeppcr", options=PARALLEL)(u, v)
        g1 = torch.autograd.grad(y1.pow(2).sum(), wrt)
    assert [s.direction for s in solves] == ["forward", "backward"] and not any(s.fell_back for s in solves)
    torch.testing.assert_close(y1, y0, rtol=1e-8, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_wider_per_step_slice_is_declined_naming_the_slice():
    report = pcr_compile.explain(SlicedInputLoop(width=2, steps=L).double(), torch.randn(3, L + 1, dtype=torch.float64),
                                 torch.randn(L, 2, dtype=torch.float64), options=PARALLEL)
    assert report.chains == [] and "slice bounds in argument" in report.declined[0].reason


def test_unit_slice_rewrite_keeps_other_indexing():
    from pcr_compile.passes.slices import unit_slices_as_indices

    g = Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.zeros(2, 3, 4)
    cases = [((slice(None), slice(1, 2)), (slice(None), 1, None)),  # the rewrite
             ((0, slice(2, 3)), (0, 2, None)), (slice(0, 1), (0, None)), ((None, slice(1, 2)), (None, 1, None)),
             ((slice(None), slice(3, 4)), None),  # beyond the dimension: an empty slice, kept
             ((slice(None), slice(-1, 0)), None), ((slice(1, 3),), None), ((slice(0, 1, 2),), None),
             ((Ellipsis, slice(0, 1)), None)]
    nodes = [g.call_function(operator.getitem, (x, idx)) for idx, _ in cases]
    assert unit_slices_as_indices(g) == sum(want is not None for _, want in cases)
    for n, (idx, want) in zip(nodes, cases):
        assert n.args[1] == (idx if want is None else want)
    t = torch.randn(2, 3, 4)
    for idx, want in cases:
        if want is not None:
            assert torch.equal(t[idx], t[want]) and t[idx].data_ptr() == t[want].data_ptr()


@pytest.mark.parametrize("beta,alpha", [(0, "lifted"), ("lifted", 0), ("lifted", "lifted"), (0.5, "lifted")])
def test_addmm_form_zero_factor_drops_its_term(beta, alpha):
    """A zero `beta` (or `alpha`), literal or per step, drops its term as aten's addmm does: a NaN in the input
    does not reach the result."""
    g = Graph()
    inp, m1, m2 = (g.placeholder(n) for n in ("inp", "m1", "m2"))
    numbers = {k: g.placeholder(k) for k, v in (("beta", beta), ("alpha", alpha)) if v == "lifted"}
    kwargs = {"beta": numbers.get("beta", beta), "alpha": numbers.get("alpha", alpha)}
    node = g.call_function(torch.addmm, (inp, m1, m2), kwargs)
    out = scalar_forms.build(g, node, (inp, m1, m2), kwargs)
    assert out is not None
    g.output(out)
    g.erase_node(node)
    form = GraphModule(torch.nn.Module(), g)
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), \
        torch.randn(5, 4, dtype=torch.float64)
    for zero_at in ("inp", "m1"):
        x, y = a.clone(), b.clone()
        (x if zero_at == "inp" else y)[0, 0] = float("nan")
        for lifted in ((0.0, 0.7), (0.7, 0.0), (0.3, 0.7)):
            vals = dict(zip(("beta", "alpha"), lifted))
            eff = {k: (vals[k] if v == "lifted" else v) for k, v in (("beta", beta), ("alpha", alpha))}
            want = torch.addmm(x, y, c, **eff)
            got = form(x, y, c, **{k: torch.tensor(vals[k], dtype=torch.float64) for k in numbers})
            torch.testing.assert_close(got, want, equal_nan=True)
