"""Sampler loops through backend="deeppcr": the sampler solve's updates on the compiled path (the
`sampler_jacobian` option, pcr_compile/solver/forward.py `_sampler`): eager's answer with each update, the race
of `sampler_jacobian="auto"` keeping scalar Newton where it is faster, its two candidates evaluated in one call
as copies of the steps (never as extra batch rows), and bad values named."""

import logging

import pytest
import torch
from conftest import rel_err
from torch import nn

import pcr_compile
from pcr_compile import solver
from pcr_compile.models import DDIMSampler, MLPDenoiser
from pcr_compile.solver.call import ChainCall

# jacobian="identity" forced: the 2-D state would otherwise get dense Newton, not the sampler solve
PARALLEL = {"mode": "parallel", "strict": True, "jacobian": "identity"}
KEPT = {"identity": "identity/auto", "scalar": "scalar/picard"}  # what each update runs as (jacobian/accel)


def compiled_run(model, *inputs, **options):
    torch._dynamo.reset()
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options={**PARALLEL, **options})(*inputs)
    [s] = solves
    return y, s


def mlp_ddim(steps: int = 23, batch: int = 16, dim: int = 2):
    torch.manual_seed(0)
    return DDIMSampler(MLPDenoiser(dim=dim, hidden=32), steps=steps), torch.randn(batch, dim)


@pytest.mark.parametrize("sampler_jacobian", ["auto", "scalar", "identity"])
def test_each_update_gives_eagers_answer(sampler_jacobian):
    model, x = mlp_ddim()
    with torch.no_grad():
        ref = model(x)
    y, s = compiled_run(model, x, sampler_jacobian=sampler_jacobian)
    assert rel_err(y, ref) < 1e-4
    assert s.converged and not s.fell_back and s.jacobian == "identity" and s.length == 23
    assert s.evaluations <= 23  # the sampler solve: never deeper than sequential
    if sampler_jacobian == "auto":
        assert s.chosen in KEPT.values()
    else:
        assert s.chosen == KEPT[sampler_jacobian]


def test_auto_keeps_scalar_newton_where_it_takes_fewer_rounds_than_picard():
    """On this DDIM loop (measured: Picard + Anderson 22 batched calls, scalar Newton 8) the default race keeps
    scalar Newton and costs no more rounds than scalar Newton alone."""
    model, x = mlp_ddim()
    with torch.no_grad():
        ref = model(x)
    rec = {j: compiled_run(model, x, sampler_jacobian=j) for j in ("identity", "scalar")}
    y, auto = compiled_run(model, x)  # the default
    assert auto.chosen == "scalar/picard"
    assert 2 * rec["scalar"][1].evaluations <= rec["identity"][1].evaluations
    assert auto.evaluations <= rec["scalar"][1].evaluations
    assert rel_err(y, ref) < 1e-4
    # the race's rounds evaluate both candidates (the first round once: both guesses are equal)
    assert rec["scalar"][1].step_evaluations < auto.step_evaluations < 2 * rec["scalar"][1].step_evaluations


def test_default_options_race_on_a_wide_sampler():
    """A state wider than dense Jacobians allow: the default decision is the matrix-free sampler solve, and the
    default update is the race (as parallel_sample's)."""
    model, x = mlp_ddim(steps=12, batch=4, dim=72)
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options={"mode": "parallel", "strict": True})(x)
    [s] = solves
    assert s.jacobian == "identity" and s.chosen in KEPT.values()
    assert s.converged and not s.fell_back
    assert s.step_evaluations >= s.evaluations  # every round evaluates at least one step
    assert rel_err(y, ref) < 1e-4


class BatchCoupledDenoiser(nn.Module):
    """A denoiser whose rows interact (a batch mean, as batch statistics do) and whose traced graph fixes the
    batch size (`expand`): evaluating two candidates as 2B rows of one call would be wrong, or fail."""

    def __init__(self):
        super().__init__()
        self.mlp = MLPDenoiser(dim=2, hidden=32)

    def forward(self, x, t):
        return self.mlp(x, t) + 0.3 * torch.tanh(x.mean(0, keepdim=True)).expand(x.shape[0], -1)


def test_race_candidates_never_share_a_call_as_rows():
    torch.manual_seed(0)
    model, x = DDIMSampler(BatchCoupledDenoiser(), steps=17), torch.randn(8, 2)
    with torch.no_grad():
        ref = model(x)
    y, s = compiled_run(model, x, sampler_jacobian="auto")
    assert s.converged and not s.fell_back, s.reason
    assert s.step_evaluations > s.evaluations * 17 // 2  # the race did evaluate two candidates at once
    assert rel_err(y, ref) < 1e-4


def test_a_failing_stacked_call_is_retried_one_candidate_at_a_time(monkeypatch, caplog):
    model, x = mlp_ddim()
    with torch.no_grad():
        ref = model(x)
    _, whole = compiled_run(model, x, sampler_jacobian="auto")
    batched = ChainCall.batched

    def no_copies(self, Zprev, *args, copies=1, **kw):
        if copies > 1:
            raise RuntimeError("out of memory (simulated)")
        return batched(self, Zprev, *args, **kw)

    monkeypatch.setattr(ChainCall, "batched", no_copies)
    with caplog.at_level(logging.WARNING, logger="pcr_compile.solver.forward"):
        y, s = compiled_run(model, x, sampler_jacobian="auto")
    assert "stacked call failed" in caplog.text
    assert s.converged and not s.fell_back and s.chosen == whole.chosen
    # rounds 2 .. RACE_ROUNDS evaluate two candidates (the first: equal guesses, evaluated once)
    race_rounds = min(whole.evaluations, solver.sampler.RACE_ROUNDS) - 1
    assert s.evaluations == whole.evaluations + race_rounds  # the second candidate's calls are counted
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("value", ["dense", "Scalar", None])
def test_bad_sampler_jacobian_is_a_value_error_naming_the_option(value):
    model, x = mlp_ddim(steps=8)
    says = r"'sampler_jacobian' must be one of \('auto', 'scalar', 'identity'\), got " + repr(value)
    with pytest.raises(Exception, match=says) as e:
        torch.compile(model, backend="deeppcr", options={"mode": "parallel", "sampler_jacobian": value})(x)
    # Dynamo wraps backend errors in BackendCompilerFailed; the ValueError is its inner exception.
    assert isinstance(getattr(e.value, "inner_exception", e.value), ValueError)
    with pytest.raises(ValueError, match="sampler_jacobian"):
        pcr_compile.Options.parse({"sampler_jacobian": value})


def test_run_forward_checks_sampler_jacobian():
    spec = solver.ChainSpec(name="unused", template=None, n_state=1, n_per_step=0, n_consts=0, n_invariants=0)
    with pytest.raises(ValueError, match="sampler_jacobian must be one of"):
        solver.run_forward(spec, [torch.zeros(2, 3)], [], [], [], 4, tol=0.0, max_iters=4, jacobian="identity",
                           sampler_jacobian="newton")
