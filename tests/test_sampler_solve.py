"""The sampler solve (`pcr_compile.solver.sampler`, `pcr_compile.diffusion.parallel_sample`) and the pipeline
wrappers, on synthetic chains and on the trained fixture (benchmarks/fixtures/blob_unet.py): never more depth
than sequential sampling, results equal to the sequential loop, the noise-level rule, and the pipelines'
images against diffusers' own sequential pipelines."""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from helpers import tiny_condition_unet

from pcr_compile.solver import sampler as sampler_solve
from pcr_compile.solver.residual import sigma_residuals

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder at the repository root, not an installed package
    sys.path.insert(0, str(ROOT))


def chain(coef: float, L: int):
    """z_l = coef * tanh(z_{l-1}) + 0.1 l: contractive for coef < 1, expansive above."""

    def evaluate(start, Zprev):
        shift = 0.1 * torch.arange(start + 1, start + 1 + Zprev.shape[0], dtype=Zprev.dtype).view(-1, 1, 1)
        return coef * torch.tanh(Zprev) + shift

    z0 = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    return z0, evaluate, sequential(z0, evaluate, L)


def sequential(z0, evaluate, L: int) -> torch.Tensor:
    """The chain's trajectory (L, ...) step by step: the reference."""
    ref, z = [], z0
    for l in range(L):
        z = evaluate(l, z.unsqueeze(0))[0]
        ref.append(z)
    return torch.stack(ref)


@pytest.mark.parametrize("jacobian", ["identity", "scalar", "auto"])
@pytest.mark.parametrize("accel", ["picard", "anderson", "auto"])
@pytest.mark.parametrize("coef,L", [(0.5, 13), (3.0, 29), (-6.0, 37)])
def test_never_deeper_than_sequential_and_exact(accel, coef, L, jacobian):
    z0, evaluate, ref = chain(coef, L)
    Z, st = sampler_solve.sampler_forward(z0, L, evaluate, tol=1e-12, accel=accel, max_iters=L,
                                          solve_dtype=torch.float64, jacobian=jacobian, stacked_rows=True)
    assert rel_err(Z, ref) < 1e-9
    assert st.depth <= L and st.evaluations <= L
    lanes = 2 if jacobian == "auto" else 1  # the race evaluates both candidates' rows
    assert st.step_evaluations <= lanes * st.evaluations * L + st.sequential_steps
    assert st.step_evaluations <= lanes * (L * (L + 1) // 2) + L  # windows shrink as steps are committed
    assert st.chosen in st.candidates and len(st.candidates) == lanes


@pytest.mark.parametrize("jacobian", ["identity", "scalar", "auto"])
@pytest.mark.parametrize("window", [5, 8])
def test_sliding_window_keeps_the_guarantees(window, jacobian):
    L = 29
    z0, evaluate, ref = chain(3.0, L)
    Z, st = sampler_solve.sampler_forward(z0, L, evaluate, tol=1e-12, max_iters=1000, solve_dtype=torch.float64,
                                          window=window, jacobian=jacobian, stacked_rows=True)
    assert rel_err(Z, ref) < 1e-9
    assert st.depth <= L
    assert st.step_evaluations <= (2 if jacobian == "auto" else 1) * window * st.evaluations + st.sequential_steps


def contracting_chain(L: int = 40):
    """z_l = 0.3 z_{l-1} + sin(l) + 0.05 tanh(z_{l-1}): each step's Jacobian is close to 0.3 I, far from the
    identity Picard assumes, so scalar Newton (secant slope ~0.3) converges in a few rounds, Picard in ~L."""

    def evaluate(start, Zprev):
        l = torch.arange(start, start + Zprev.shape[0], dtype=Zprev.dtype).view(-1, 1, 1)
        return 0.3 * Zprev + torch.sin(l) + 0.05 * torch.tanh(Zprev)

    z0 = torch.linspace(-2, 2, 16, dtype=torch.float64).reshape(2, 8)
    return z0, evaluate, sequential(z0, evaluate, L)


def test_scalar_newton_converges_where_picard_crawls():
    L = 40
    z0, evaluate, ref = contracting_chain(L)
    solve = dict(tol=1e-10, max_iters=L, solve_dtype=torch.float64, stacked_rows=True)
    Z, sc = sampler_solve.sampler_forward(z0, L, evaluate, accel="picard", jacobian="scalar", **solve)
    _, pic = sampler_solve.sampler_forward(z0, L, evaluate, accel="auto", jacobian="identity", **solve)
    assert rel_err(Z, ref) < 1e-9 and sc.converged
    assert sc.evaluations <= 8 and pic.evaluations >= 3 * sc.evaluations
    # a prior equal to the true linear part: the first Newton round is already (nearly) exact
    _, primed = sampler_solve.sampler_forward(z0, L, evaluate, accel="picard", jacobian="scalar",
                                              gain=torch.full((L,), 0.3, dtype=torch.float64), **solve)
    assert primed.evaluations <= sc.evaluations


def test_scalar_newton_is_unmixed_unless_anderson_is_asked_for():
    """jacobian="scalar" with the default accel="auto" is the race's scalar candidate (no Anderson mixing);
    accel="anderson" mixes it."""
    L = 40
    z0, evaluate, ref = contracting_chain(L)
    solve = dict(tol=1e-10, max_iters=L, solve_dtype=torch.float64, jacobian="scalar")
    Z, dflt = sampler_solve.sampler_forward(z0, L, evaluate, **solve)
    Zp, plain = sampler_solve.sampler_forward(z0, L, evaluate, accel="picard", **solve)
    _, mixed = sampler_solve.sampler_forward(z0, L, evaluate, accel="anderson", **solve)
    assert dflt.candidates == ["scalar/picard"] and mixed.candidates == ["scalar/anderson"]
    assert torch.equal(Z, Zp) and dflt.evaluations == plain.evaluations and rel_err(Z, ref) < 1e-9


def test_auto_races_and_keeps_the_faster_candidate_on_a_constructed_chain():
    L = 40
    z0, evaluate, ref = contracting_chain(L)
    Z, st = sampler_solve.sampler_forward(z0, L, evaluate, tol=1e-10, max_iters=L, solve_dtype=torch.float64,
                                          jacobian="auto", stacked_rows=True)
    assert st.candidates == ["identity/auto", "scalar/picard"] and st.chosen == "scalar/picard"
    assert rel_err(Z, ref) < 1e-9 and st.depth <= 8
    # the first round's guesses are the same for both candidates: evaluated once
    assert st.step_evaluations < 2 * L * st.evaluations


def test_divergence_is_detected_before_max_iters():
    """An expansive chain whose suffix blows up under Picard: clamped, detected, finished sequentially."""
    L = 60
    z0, evaluate, ref = chain(-40.0, L)
    Z, st = sampler_solve.sampler_forward(z0, L, evaluate, tol=1e-12, accel="picard", max_iters=1000,
                                          solve_dtype=torch.float64)
    assert rel_err(Z, ref) < 1e-9
    assert st.depth <= L and st.iterations < 40
    assert all(r == r and r < 1e6 for r in st.residuals)  # the clamp keeps every guess bounded


def test_anderson_with_a_singular_history_takes_the_picard_step():
    """Collinear history differences make the float32 least squares exactly singular (the 1e-8 regulariser is below
    rounding): torch.linalg.solve raised and ended the whole solve; that step and row now take the Picard step."""
    torch.manual_seed(0)
    d = torch.randn(3, 2, 5)
    Z, R = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    out = sampler_solve._anderson(Z, R, torch.stack([d, 2 * d]), torch.stack([d, d]))
    torch.testing.assert_close(out, Z + R, rtol=0, atol=0)


def test_sigma_rule_is_rms_over_noise_level():
    r = torch.zeros(3, 2, 4)
    r[1, 0] = torch.tensor([3.0, 0.0, 0.0, 4.0])  # RMS sqrt(25 / 4) = 2.5
    r[2, 1] = float("nan")
    rho = sigma_residuals(r, torch.tensor([1.0, 0.5, 2.0]))
    assert rho.tolist() == [0.0, 5.0, float("inf")]
    parts = sigma_residuals(r, torch.ones(3), parts=[2, 2])  # each part's RMS: max(sqrt(9/2), sqrt(16/2))
    assert parts[1] == pytest.approx(8**0.5)


def test_bad_arguments_name_the_argument():
    z0, evaluate, _ = chain(0.5, 4)
    with pytest.raises(ValueError, match="accel"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, accel="newton")
    with pytest.raises(ValueError, match="rule"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, rule="loose")
    with pytest.raises(ValueError, match="sigma"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, rule="sigma")
    with pytest.raises(ValueError, match="jacobian"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, jacobian="dense")
    with pytest.raises(ValueError, match="stacked_rows"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, jacobian="auto")
    with pytest.raises(ValueError, match="gain"):
        sampler_solve.sampler_forward(z0, 4, evaluate, tol=1e-6, jacobian="scalar", gain=torch.ones(3))


diffusers = pytest.importorskip("diffusers", reason="the fixture is a diffusers UNet2DModel")


@pytest.fixture(scope="module")
def unet():
    from benchmarks.fixtures.blob_unet import CHECKPOINT, load_blob_unet

    assert CHECKPOINT.stat().st_size < 1 << 20  # committed, under 1 MB
    torch.set_num_threads(1)
    return load_blob_unet()


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False),
    "ddim-clip": lambda: diffusers.DDIMScheduler(),
    "ddim-eta": lambda: diffusers.DDIMScheduler(),  # with eta=1: stochastic
    "ddpm": lambda: diffusers.DDPMScheduler(),
    "euler": lambda: diffusers.EulerDiscreteScheduler(),
    "dpm": lambda: diffusers.DPMSolverMultistepScheduler(),
}


@pytest.mark.parametrize("jacobian", ["auto", "scalar", "identity"])  # "auto": the default
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_fixture_samplers_never_deeper_than_sequential(unet, name, jacobian):
    from pcr_compile.diffusion import sampling_loop
    from pcr_compile.diffusion.parallel import parallel_sample

    steps = 12
    loop = sampling_loop(unet, SCHEDULERS[name](), steps, **({"eta": 1.0} if name == "ddim-eta" else {}))
    latents = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * loop.init_noise_sigma
    with torch.no_grad():
        ref = loop(latents, generator=torch.Generator().manual_seed(1))
    kw = {} if jacobian == "auto" else {"jacobian": jacobian}  # otherwise default options
    y, st = parallel_sample(loop, latents, generator=torch.Generator().manual_seed(1), **kw)
    assert rel_err(y, ref) < 1e-4
    assert st.depth <= steps
    assert st.step_evaluations <= (2 if jacobian == "auto" else 1) * steps * (steps + 1) // 2


@pytest.mark.parametrize("name,steps,tol,faster", [("ddim-clip", 50, 1e-4, "scalar"), ("dpm", 50, 1e-4, "identity")])
def test_auto_keeps_the_candidate_that_is_faster_on_the_fixture(unet, name, steps, tol, faster):
    """Two measured cases with opposite answers (benchmarks/RESULTS.md): clipped DDIM-50, where scalar Newton
    takes 16 rounds and Picard + Anderson 20, and DPM-Solver++-50, 29 against 24."""
    from pcr_compile.diffusion import sampling_loop
    from pcr_compile.diffusion.parallel import parallel_sample

    loop = sampling_loop(unet, SCHEDULERS[name](), steps)
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loop(latents)
    single = {j: parallel_sample(loop, latents, tol=tol, jacobian=j, accel="picard" if j == "scalar" else "auto")[1]
              for j in ("identity", "scalar")}
    assert single[faster].depth < min(st.depth for st in single.values() if st is not single[faster])
    y, st = parallel_sample(loop, latents, tol=tol)  # jacobian="auto"
    assert st.chosen.startswith(faster)
    assert st.depth <= single[faster].depth + 1
    assert rel_err(y, ref) < 1e-2


def test_singular_anderson_on_a_dpm_solver_loop_matches_sequential():
    """DPM-Solver++ with lambda_min_clipped, 37 steps, over an MLP: the case that hit the singular system."""
    from pcr_compile.diffusion import parallel_sample, sampling_loop
    from pcr_compile.models import MLPDenoiser

    torch.manual_seed(0)
    mlp = MLPDenoiser(dim=2, hidden=32, emb=8).eval()
    loop = sampling_loop(mlp, diffusers.DPMSolverMultistepScheduler(lambda_min_clipped=-5.1), 37)
    latents = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loop(latents)
    y, st = parallel_sample(loop, latents, jacobian="identity")
    assert rel_err(y, ref) < 1e-4 and st.depth <= 37


def test_parallel_sample_rejects_a_bad_jacobian(unet):
    from pcr_compile.diffusion import parallel_sample, sampling_loop

    loop = sampling_loop(unet, SCHEDULERS["ddim"](), 4)
    with pytest.raises(ValueError, match="jacobian"):
        parallel_sample(loop, torch.randn(1, 1, 16, 16), jacobian="dense")


def test_parallel_sample_argument_errors_name_the_argument(unet):
    """tol=inf accepted every guess (the first round's image, 2x off the sequential one); latents the unet cannot
    take failed deep inside its first batched call; an empty batch raised IndexError (the loop returns it)."""
    from pcr_compile.diffusion import parallel_sample, sampling_loop

    loop = sampling_loop(unet, SCHEDULERS["ddim"](), 4)
    latents = torch.randn(2, 1, 16, 16)
    for tol in (math.inf, math.nan, 0.0, -1.0):
        with pytest.raises(ValueError, match="tol must be None or a finite positive number"):
            parallel_sample(loop, latents, tol=tol)
    bad = {"latents must be a tensor": latents.numpy(), "floating-point": latents.long(),
           r"latents must be \(batch, 1, \.\.\.\)": torch.randn(2, 3, 16, 16),
           "latents are torch.float64 but the unet is torch.float32": latents.double()}
    for match, value in bad.items():
        with pytest.raises((TypeError, ValueError), match=match):
            parallel_sample(loop, value)
    empty = torch.randn(0, 1, 16, 16)
    with torch.no_grad():
        ref = loop(empty)
    y, st = parallel_sample(loop, empty)
    assert y.shape == ref.shape == (0, 1, 16, 16) and st.depth == 0


def test_sigma_rule_takes_fewer_rounds_at_a_bounded_error(unet):
    from pcr_compile.diffusion import sampling_loop
    from pcr_compile.diffusion.parallel import parallel_sample

    loop = sampling_loop(unet, diffusers.DDIMScheduler(clip_sample=False), 20)
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = loop(latents)
    y_exact, exact = parallel_sample(loop, latents)
    y_sigma, sigma = parallel_sample(loop, latents, rule="sigma", tol=1e-3)
    assert rel_err(y_exact, ref) < 1e-4
    assert sigma.evaluations < exact.evaluations
    assert rel_err(y_sigma, ref) < 3e-2


@pytest.mark.parametrize("pipeline", ["DDIMPipeline", "DDPMPipeline"])
def test_pipeline_images_match_the_sequential_pipeline(unet, pipeline):
    import numpy as np

    from pcr_compile.diffusion import parallel_pipeline

    sched = diffusers.DDIMScheduler() if pipeline == "DDIMPipeline" else diffusers.DDPMScheduler()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=10, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    par = parallel_pipeline(pipe)
    out = par(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == ref.shape == (2, 16, 16, 1)
    assert np.abs(out - ref).max() < 1e-4
    assert par.last_stats.depth <= 10
    (pil,) = par(generator=torch.Generator().manual_seed(0), batch_size=1, num_inference_steps=4,
                 return_dict=False)
    assert len(pil) == 1 and pil[0].size == (16, 16)
    with pytest.raises(NotImplementedError, match="DDIMPipeline"):
        parallel_pipeline(object())


def _pipeline_pair(unet, pipeline, scheduler):
    from pcr_compile.diffusion import parallel_pipeline

    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = scheduler  # swapped in after construction (DDIMPipeline's __init__ converts to DDIM)
    pipe.set_progress_bar_config(disable=True)
    return pipe, parallel_pipeline(pipe)


def test_pipeline_with_a_scaling_scheduler_runs_the_pipelines_loop(unet):
    """DDPMPipeline's loop calls neither scale_model_input nor multiplies by init_noise_sigma, also with an Euler
    scheduler swapped in: the wrapper did both (every image off by up to 1.0)."""
    import numpy as np

    pipe, par = _pipeline_pair(unet, "DDPMPipeline", diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDPMScheduler().config))
    kw = dict(batch_size=2, num_inference_steps=6, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    out = par(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(out - ref).max() < 1e-4
    assert not par.last_stats.fell_back and par.last_stats.depth <= 6


def test_scheduler_swapped_on_the_wrapper_is_the_pipelines(unet):
    """`par.scheduler = X.from_config(par.scheduler.config)`, diffusers' idiom, on the wrapper: it was set on the
    wrapper only, read back, and never run (images 0.9 off the swapped pipeline's)."""
    import numpy as np

    pipe, par = _pipeline_pair(unet, "DDPMPipeline", diffusers.DDPMScheduler())
    par.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(par.scheduler.config)
    assert pipe.scheduler is par.scheduler
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    out = par(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(out - ref).max() < 1e-4
    par.last_stats = None  # the wrapper's own attributes stay its own
    assert "last_stats" not in vars(pipe)


def test_pipeline_arguments_bind_as_the_wrapped_pipelines():
    """DDPMPipeline takes (batch_size, generator, num_inference_steps, ...) and no eta: positional arguments mean
    what they mean there (the wrapper took DDIM's order: the third was eta, the steps stayed 1000)."""
    import numpy as np

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    pipe, par = _pipeline_pair(unet, "DDPMPipeline", diffusers.DDPMScheduler())
    (ref,) = pipe(2, torch.Generator().manual_seed(0), 3, "np", False)
    (out,) = par(2, torch.Generator().manual_seed(0), 3, "np", False)
    assert np.abs(out - ref).max() < 1e-4 and par.last_stats.depth <= 3
    for bad in ({"eta": 0.5}, {"use_clipped_model_output": True}, {"foo": 1}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            par(num_inference_steps=3, **bad)


@pytest.mark.parametrize("pipeline,scheduler", [
    ("DDPMPipeline", lambda: diffusers.EulerAncestralDiscreteScheduler.from_config(diffusers.DDPMScheduler().config)),
    ("DDIMPipeline", lambda: diffusers.DDIMScheduler(thresholding=True)),
])
def test_pipeline_with_an_unsupported_scheduler_runs_the_pipeline_itself(unet, pipeline, scheduler, caplog):
    """What sampling_loop declines (ancestral Euler, thresholding) still gives the sequential pipeline's images,
    from the pipeline's own loop, with a warning and the fallback in last_stats (it raised NotImplementedError)."""
    import numpy as np

    pipe, par = _pipeline_pair(unet, pipeline, scheduler())
    kw = dict(batch_size=2, num_inference_steps=4, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with caplog.at_level("WARNING", logger="pcr_compile.diffusion.pipelines"):
        out = par(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(out, ref)
    st = par.last_stats
    assert st.fell_back and "does not support" in st.reason and st.depth == 4 and st.evaluations == 0
    assert "sequential loop" in caplog.text


def test_a_call_that_raises_leaves_no_stats_of_an_earlier_call(unet):
    """last_stats describes the last call: one that raises (here in the wrapped pipeline's own loop, PNDM's step
    taking no generator; or on a bad argument) leaves None, not the stats of the call before it."""
    pipe, par = _pipeline_pair(unet, "DDPMPipeline", diffusers.DDPMScheduler())
    par(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert par.last_stats is not None and par.last_stats.evaluations >= 1
    with pytest.raises(ValueError, match="generators"):
        par(batch_size=2, num_inference_steps=3, generator=[torch.Generator()])
    assert par.last_stats is None
    par(num_inference_steps=3, output_type="np")
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="generator"):
        par(num_inference_steps=6, output_type="np", generator=torch.Generator().manual_seed(0))
    assert par.last_stats is None


def test_condition_unet_kwargs_are_tiled_over_the_steps():
    """UNet2DConditionModel: encoder_hidden_states (batch-leading) reach every step of a batched round."""
    from pcr_compile.diffusion import parallel_sample, sampling_loop

    torch.manual_seed(0)
    unet = tiny_condition_unet()
    latents, cond = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 8)
    loop = sampling_loop(unet, diffusers.DDIMScheduler(), 6)
    with torch.no_grad():
        ref = loop(latents, encoder_hidden_states=cond)
    y, st = parallel_sample(loop, latents, encoder_hidden_states=cond)
    assert rel_err(y, ref) < 1e-4 and st.depth <= 6


def test_x0_gain_is_the_step_derivative_with_the_clean_sample_fixed():
    """DDIM (eps, v or sample prediction, clipped or not): sqrt(1 - a') / sqrt(1 - a); Euler: sigma' / sigma."""
    import math

    from pcr_compile.diffusion import sampling_loop

    for kw in ({"clip_sample": False}, {}, {"clip_sample": False, "prediction_type": "v_prediction"},
               {"clip_sample": False, "prediction_type": "sample"}):
        sched = diffusers.DDIMScheduler(**kw)
        plan = sampling_loop(lambda x, t: x, sched, 10).plan
        ac, final = sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod)
        for st in plan.steps:
            prev = st.timestep - 100
            a, a_prev = float(ac[st.timestep]), float(ac[prev]) if prev >= 0 else final
            assert st.x0_gain == pytest.approx(math.sqrt(1 - a_prev) / math.sqrt(1 - a), abs=1e-12), kw
    sched = diffusers.EulerDiscreteScheduler()
    plan = sampling_loop(lambda x, t: x, sched, 10).plan
    sched.set_timesteps(10)
    sig = [float(s) for s in sched.sigmas]
    assert [st.x0_gain for st in plan.steps] == pytest.approx([b / a for a, b in zip(sig, sig[1:])])
