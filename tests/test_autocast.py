"""Chains under torch.autocast: a region in the compiled code, one around the compiled call, and regions a
step opens itself. The chain op's template enters the steps' autocast contexts, so its evaluations cast as
eager's do; the default tolerance follows the compute dtype (``solver.newton.AUTOCAST_TOL``)."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, dynamo_graph

import pcr_compile
from pcr_compile.backend import chain_spec
from pcr_compile.passes.chains import find_chains
from pcr_compile.passes.chains.validate import autocast_states
from pcr_compile.solver.newton import AUTOCAST_TOL, default_tol

BF16 = 3 * torch.finfo(torch.bfloat16).eps  # bfloat16 rounding, compounded over a few steps


class TanhStack(nn.Module):
    """`x = tanh(W_l x + b_l)` in a bfloat16 region of the compiled code: the state itself is bfloat16."""

    def __init__(self, layers=12, width=8):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for lin in self.lins:
                x = torch.tanh(lin(x))
        return x.float()


class ResidualStack(nn.Module):
    """`x = x + s tanh(W_l x + b_l)`: a float32 state whose steps compute their matmuls in `dtype`."""

    def __init__(self, layers=32, width=8, scale=0.3, dtype=torch.bfloat16, region=True):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.scale, self.dtype, self.region = scale, dtype, region

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype) if self.region else contextlib.nullcontext():
            for lin in self.lins:
                x = x + self.scale * torch.tanh(lin(x))
        return x

    def float32_math(self, x):
        for lin in self.lins:
            x = x + self.scale * torch.tanh(lin(x))
        return x


def _train(model, compiled, x):
    """Forward and backward through `compiled` and through `model` (eager), under record_solves."""
    with pcr_compile.record_solves() as solves:
        y = compiled(x)
        y.float().sum().backward()
    got = (y.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()])
    x.grad = None
    model.zero_grad()
    y0 = model(x)
    y0.float().sum().backward()
    return solves, got, (y0.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()])


def test_a_chain_inside_an_autocast_region_is_solved_in_its_dtype():
    torch.manual_seed(0)
    model = TanhStack()
    x = torch.randn(4, 8, requires_grad=True)
    [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
    assert chain.autocast == (("cpu", torch.bfloat16, True, None),)
    solves, (y, gx, gp), (y0, gx0, gp0) = _train(model, torch.compile(model, backend="deeppcr", options=PARALLEL), x)
    assert {s.direction for s in solves} == {"forward", "backward"} and all(s.converged for s in solves)
    assert y.dtype == y0.dtype
    assert rel_err(y, y0) < BF16 and rel_err(gx, gx0) < BF16 and grads_rel_err(gp, gp0) < 4 * BF16


def test_a_chain_compiled_inside_an_autocast_region_around_the_call_is_solved():
    """No _enter_autocast node in Dynamo's graph: the contexts open around the call are the template's."""
    torch.manual_seed(0)
    model = ResidualStack(layers=12, region=False)  # the float32 residual stream of mixed-precision training
    x = torch.randn(4, 8, requires_grad=True)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    with torch.no_grad():
        outside = compiled(x)  # compiled first outside autocast: float32 math, as eager
    assert rel_err(outside, model(x)) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Dynamo guards the autocast state: a new graph
        [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
        assert chain.autocast == (("cpu", torch.bfloat16, True, torch.is_autocast_cache_enabled()),)
        solves, (y, gx, gp), (y0, gx0, gp0) = _train(model, compiled, x)
    assert {s.direction for s in solves} == {"forward", "backward"}
    assert rel_err(y, y0) < BF16 and rel_err(gx, gx0) < BF16 and grads_rel_err(gp, gp0) < 4 * BF16
    assert rel_err(y, outside) > 1e-4  # computed in bfloat16 indeed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_state_computed_in_lower_precision_stops_at_that_precision(dtype):
    """The residual of an exact solve is as large as the casts' rounding, which batched evaluation does not
    repeat bit for bit: under float32's tolerance Newton crept one step an iteration (39 for 64 steps). The
    compute dtype's tolerance stops in a few, as accurate against float32 math as eager's own autocast."""
    torch.manual_seed(0)
    model = ResidualStack(dtype=dtype)
    x = torch.randn(16, 8)
    [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
    spec = chain_spec(chain)
    assert spec.compute_dtype == dtype and spec.lp is None  # never the fused act(Wx + b) kernels
    assert default_tol(torch.float32, dtype) == AUTOCAST_TOL[dtype] > default_tol(torch.float32)
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        y0, exact = model(x), model.float32_math(x)
    [solve] = solves
    assert solve.converged and solve.iterations <= 6, solve
    # autocast was applied (the result is not float32 math), and to no worse accuracy than eager's
    assert rel_err(y, exact) > 1e-2 * rel_err(y0, exact) > 1e-6
    assert rel_err(y, exact) < 2 * rel_err(y0, exact)


class SoftmaxInFloat32(nn.Module):
    """Each step turns autocast off around a float32 softmax, inside a bfloat16 region around the loop."""

    def __init__(self, layers=10, width=8):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.b = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for a, b in zip(self.a, self.b):
                h = torch.tanh(a(x))
                with torch.autocast("cpu", enabled=False):
                    h = F.softmax(h.float(), -1) * 2.0
                x = x + 0.5 * b(h)
        return x.float()


class RegionPerStep(nn.Module):
    """A bfloat16 region each step opens and closes itself; the state is float32 outside them."""

    def __init__(self, layers=10, width=8):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for lin in self.lins:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = torch.tanh(lin(x))
            x = x + 0.3 * h
        return x


@pytest.mark.parametrize("make", [SoftmaxInFloat32, RegionPerStep])
def test_regions_a_step_opens_itself_are_copied_into_the_template(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(4, 8, requires_grad=True)
    [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
    assert chain.length == 10
    markers = [n for n in chain_spec(chain).template.graph.nodes if n.target is torch.amp._enter_autocast]
    assert [n.args[2] for n in markers] == ([True, False] if make is SoftmaxInFloat32 else [True])
    solves, (y, gx, gp), (y0, gx0, gp0) = _train(model, torch.compile(model, backend="deeppcr", options=PARALLEL), x)
    assert {s.direction for s in solves} == {"forward", "backward"}
    assert rel_err(y, y0) < BF16 and rel_err(gx, gx0) < BF16 and grads_rel_err(gp, gp0) < 4 * BF16


class RegionFromTheMiddle(nn.Module):
    def __init__(self, layers=24, width=8):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        half = len(self.lins) // 2
        for lin in self.lins[:half]:
            x = x + 0.3 * torch.tanh(lin(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for lin in self.lins[half:]:
                x = x + 0.3 * torch.tanh(lin(x))
        return x


def test_a_region_opening_in_the_middle_of_a_repeat_splits_it():
    torch.manual_seed(0)
    model = RegionFromTheMiddle()
    x = torch.randn(4, 8)
    chains = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
    assert [(c.length, c.autocast) for c in chains] == [(12, ()), (12, (("cpu", torch.bfloat16, True, None),))]
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    assert len(solves) == 2 and rel_err(y, model(x)) < BF16


def test_autocast_states_follow_nested_regions():
    gm = dynamo_graph(SoftmaxInFloat32(layers=2), torch.randn(2, 8))
    states = autocast_states(gm.graph)
    by_name = {n.name: states[n] for n in gm.graph.nodes}
    outer = ("cpu", torch.bfloat16, True, None)
    inner = ("cpu", None, False, None)
    assert by_name["linear"] == (outer,)
    [softmax] = [n for n in gm.graph.nodes if n.target is F.softmax][:1]
    assert states[softmax] == (outer, inner)
    assert states[next(n for n in gm.graph.nodes if n.op == "output")] == ()


def test_explain_names_the_autocast_dtype():
    report = pcr_compile.explain(TanhStack(), torch.randn(4, 8), options={"mode": "parallel"})
    [chain] = report.chains
    assert chain.autocast == "bfloat16" and "(autocast bfloat16)" in report.chain_table()
    assert report.to_dict()["chains"][0]["autocast"] == "bfloat16"
    [plain] = pcr_compile.explain(ResidualStack(region=False), torch.randn(4, 8)).chains
    assert plain.autocast == ""


class DisabledLinear(ResidualStack):
    """Each step turns autocast off around its matmul: inside a bfloat16 region it still computes in float32
    (tanh and add are not cast by CPU autocast)."""

    def forward(self, x):
        for lin in self.lins:
            with torch.autocast("cpu", enabled=False):
                h = lin(x)
            x = x + self.scale * torch.tanh(h)
        return x


@pytest.mark.parametrize("case", ["float64", "autocast off"])
def test_steps_autocast_does_not_cast_keep_their_dtypes_tolerance(case):
    """Autocast leaves float64 alone, and ops inside `autocast(enabled=False)` uncast: those steps compute in
    their state's dtype, and must match eager as closely as outside autocast. Their default tolerance was
    bfloat16's (any op inside an enabled region counted), 1e-3 off eager's float64 or float32 answer; and a
    float64 chain after a float32 one with the same template reused its op, tolerance included."""
    torch.manual_seed(0)
    model = ResidualStack(layers=16, region=False) if case == "float64" else DisabledLinear(layers=16)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        if case == "float64":  # the same template, cast to bfloat16, first: its op's name must differ
            torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
            model, x = model.double(), x.double()
            torch._dynamo.reset()
        [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
        assert chain_spec(chain).compute_dtype is None
        with pcr_compile.record_solves() as solves:
            y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
        y0 = model(x)
        report = pcr_compile.explain(model, x, options={"mode": "parallel"})
    assert [s.converged for s in solves] == [True]
    assert rel_err(y, y0) < (1e-9 if case == "float64" else 1e-5)
    assert report.chains[0].autocast == ""


class CheckpointedRegion(nn.Module):
    """Each step is a checkpointed body that opens a bfloat16 region itself."""

    def __init__(self, layers=16, width=8):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    @staticmethod
    def body(lin, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x + 0.3 * torch.tanh(lin(x))

    def forward(self, x):
        for lin in self.lins:
            x = torch.utils.checkpoint.checkpoint(self.body, lin, x, use_reentrant=False)
        return x


def test_a_region_inside_a_checkpointed_body_sets_the_compute_dtype():
    """The body's region was not seen (only the template's own markers were read): float32's tolerance,
    and Newton crept one step an iteration (12 of 16)."""
    torch.manual_seed(0)
    model = CheckpointedRegion()
    x = torch.randn(4, 8, requires_grad=True)
    [chain] = find_chains(dynamo_graph(model, x).graph, min_length=8).chains
    assert chain_spec(chain).compute_dtype == torch.bfloat16
    assert pcr_compile.explain(model, x, options={"mode": "parallel"}).chains[0].autocast == "bfloat16"
    solves, (y, gx, gp), (y0, gx0, gp0) = _train(model, torch.compile(model, backend="deeppcr", options=PARALLEL), x)
    assert all(s.converged and s.iterations <= 6 for s in solves), solves
    assert rel_err(y, y0) < BF16 and rel_err(gx, gx0) < BF16 and grads_rel_err(gp, gp0) < 4 * BF16


def test_explain_names_the_dtype_of_a_region_each_step_opens():
    [chain] = pcr_compile.explain(RegionPerStep(), torch.randn(4, 8), options={"mode": "parallel"}).chains
    assert chain.autocast == "bfloat16"
