"""Tests for `pcr_compile.diffusion`: graph-break-free sampler loops against diffusers' own loops.

The reference is diffusers' documented sampling loop (`scale_model_input`, the denoiser, `scheduler.step`), run
on the same tiny models; the loop under test must match it in eager mode to 1e-4 of the output's scale, trace
into one Dynamo graph, and repeat the same op sequence at every step.
"""

from __future__ import annotations

import importlib.util
import operator
import sys

import pytest
import torch
from helpers import tiny_condition_unet

from pcr_compile.diffusion import SamplingLoop, sampling_loop
from pcr_compile.models import MLPDenoiser

diffusers = pytest.importorskip("diffusers", reason="the adapter is tested against diffusers' schedulers")

SCHEDULERS = {
    "ddim": lambda **cfg: diffusers.DDIMScheduler(**cfg),
    "ddpm": lambda **cfg: diffusers.DDPMScheduler(**cfg),
    "euler": lambda **cfg: diffusers.EulerDiscreteScheduler(**cfg),
    "dpm": lambda **cfg: diffusers.DPMSolverMultistepScheduler(**cfg),
}


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLPDenoiser(dim=2, hidden=32, emb=8).eval()


def reference_loop(unet, scheduler, steps, latents, generator=None, step_kwargs=None, **unet_kwargs):
    """diffusers' own loop, as its pipelines write it: latents scaled by init_noise_sigma before the first step."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, **unet_kwargs)
        m = out.sample if hasattr(out, "sample") else out
        x = scheduler.step(m, t, x, generator=generator, **(step_kwargs or {})).prev_sample
    return x


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    """max |out - ref| <= rel * max |ref|."""
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=0.0, atol=rel * ref.abs().max().item())


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def step_segments(gm: torch.fx.GraphModule, steps: int) -> tuple[list, list[list]]:
    """Split the op sequence of a captured sampler graph into (stem, per-step segments).

    A step starts at the `torch.full` that builds its timestep; the steps must be contiguous, of equal length,
    and nothing may follow the last one.
    """
    ops = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    starts = [i for i, (_, target) in enumerate(ops) if target is torch.full]
    assert len(starts) == steps, f"expected one timestep tensor per step, found {len(starts)}"
    period = starts[1] - starts[0]
    assert starts == [starts[0] + k * period for k in range(steps)]
    assert len(ops) == starts[-1] + period, "ops after the last step"
    return ops[:starts[0]], [ops[s:s + period] for s in starts]


# Eager equivalence with diffusers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_unet_matches_diffusers(name):
    unet = tiny_unet()
    torch.manual_seed(3)
    latents = torch.randn(2, 2, 8, 8)
    loop = sampling_loop(unet, SCHEDULERS[name](), 5)
    with torch.no_grad():
        ref = reference_loop(unet, SCHEDULERS[name](), 5, latents, generator=gen())
        out = loop(latents * loop.init_noise_sigma, generator=gen())
    assert_close_rel(out, ref)


MLP_CASES = {  # name: (scheduler, config, sampling_loop / step kwargs)
    "ddim": ("ddim", {}, {}),
    "ddim-noclip-v": ("ddim", {"clip_sample": False, "prediction_type": "v_prediction"}, {}),
    "ddim-sample-trailing": ("ddim", {"prediction_type": "sample", "timestep_spacing": "trailing",
                                      "set_alpha_to_one": False}, {}),
    "ddim-offset-noclip": ("ddim", {"steps_offset": 1, "clip_sample": False, "beta_schedule": "scaled_linear"}, {}),
    "ddim-eta": ("ddim", {"clip_sample": False}, {"eta": 0.7}),
    "ddim-eta-clipped-eps": ("ddim", {"clip_sample_range": 0.5}, {"eta": 1.0, "use_clipped_model_output": True}),
    "ddim-zero-snr": ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                               "prediction_type": "v_prediction"}, {}),
    "ddpm": ("ddpm", {}, {}),
    "ddpm-noclip-v-large": ("ddpm", {"clip_sample": False, "prediction_type": "v_prediction",
                                     "variance_type": "fixed_large"}, {}),
    "ddpm-sample-log-trailing": ("ddpm", {"prediction_type": "sample", "variance_type": "fixed_small_log",
                                          "timestep_spacing": "trailing"}, {}),
    "ddpm-cosine": ("ddpm", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, {}),
    "euler": ("euler", {}, {}),
    "euler-v": ("euler", {"prediction_type": "v_prediction"}, {}),
    "euler-sample-leading": ("euler", {"prediction_type": "sample", "timestep_spacing": "leading",
                                       "steps_offset": 1}, {}),
    "euler-karras": ("euler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, {}),
    "euler-churn": ("euler", {}, {"s_churn": 1.0, "s_tmin": 0.5, "s_noise": 1.003}),
    "dpm++2m": ("dpm", {}, {}),
    "dpm++3m": ("dpm", {"solver_order": 3}, {}),
    "dpm++1": ("dpm", {"solver_order": 1}, {}),
    "dpm++2m-karras-v": ("dpm", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}),
    "dpm++2m-sigma-min-nolof": ("dpm", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    "dpm2m": ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    "dpm2m-sample-trailing": ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                      "prediction_type": "sample", "timestep_spacing": "trailing"}, {}),
}


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_plain_callable_matches_diffusers(case):
    name, cfg, kwargs = MLP_CASES[case]
    mlp = tiny_mlp()
    denoiser = lambda x, t: mlp(x, t)  # a plain callable, not a module
    torch.manual_seed(4)
    latents = torch.randn(6, 2)
    loop = sampling_loop(denoiser, SCHEDULERS[name](**cfg), 7, **kwargs)
    with torch.no_grad():
        ref = reference_loop(denoiser, SCHEDULERS[name](**cfg), 7, latents, generator=gen(), step_kwargs=kwargs)
        out = loop(latents * loop.init_noise_sigma, generator=gen())
    assert_close_rel(out, ref)
    if loop.plan.stochastic:  # the noise really matters: another seed gives another sample
        other = loop(latents * loop.init_noise_sigma, generator=gen(2))
        assert (other - ref).abs().max() > 1e-3 * ref.abs().max()


def test_condition_unet_and_unet_kwargs():
    """UNet2DConditionModel: extra keywords (encoder_hidden_states) reach the denoiser at every step."""
    torch.manual_seed(0)
    unet = tiny_condition_unet()
    latents, cond = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 8)
    loop = sampling_loop(unet, diffusers.EulerDiscreteScheduler(), 4)
    with torch.no_grad():
        ref = reference_loop(unet, diffusers.EulerDiscreteScheduler(), 4, latents, encoder_hidden_states=cond)
        out = loop(latents * loop.init_noise_sigma, encoder_hidden_states=cond)
        other = loop(latents * loop.init_noise_sigma, encoder_hidden_states=torch.zeros_like(cond))
    assert_close_rel(out, ref)
    assert (other - out).abs().max() > 1e-4 * out.abs().max()


def test_generator_list_and_explicit_noise():
    """One generator per sample, as diffusers allows; and pre-drawn noise passed in gives the same sample."""
    mlp = tiny_mlp()
    latents = torch.randn(3, 2)
    loop = sampling_loop(mlp, diffusers.DDPMScheduler(), 6)
    with torch.no_grad():
        ref = reference_loop(mlp, diffusers.DDPMScheduler(), 6, latents, generator=[gen(s) for s in range(3)])
        out = loop(latents, generator=[gen(s) for s in range(3)])
        noise = loop.draw_noise(latents, gen(5))
        assert noise.shape == (6, 3, 2)
        assert (noise[-1] == 0).all()  # DDPM draws nothing at t = 0
        torch.testing.assert_close(loop(latents, noise=noise), loop(latents, generator=gen(5)), rtol=0, atol=0)
    assert_close_rel(out, ref)
    with pytest.raises(ValueError, match="noise must have shape"):
        loop(latents, noise=noise[1:])
    # a longer list: diffusers' randn_tensor draws from the first `batch` only (the loop stacked 4 rows and crashed)
    with torch.no_grad():
        ref = reference_loop(mlp, diffusers.DDPMScheduler(), 6, latents, generator=[gen(s) for s in range(4)])
        assert_close_rel(loop(latents, generator=[gen(s) for s in range(4)]), ref)
        with pytest.raises(ValueError, match="generator: a list of 2 generators for a batch of 3"):
            loop(latents, generator=[gen(0), gen(1)])


def test_loop_is_a_module_and_scheduler_untouched():
    unet = tiny_mlp()
    scheduler = diffusers.EulerDiscreteScheduler()
    loop = sampling_loop(unet, scheduler, 5)
    assert isinstance(loop, SamplingLoop) and isinstance(loop, torch.nn.Module)
    assert {id(p) for p in unet.parameters()} <= {id(p) for p in loop.parameters()}
    assert scheduler.num_inference_steps is None  # set_timesteps ran on a copy
    assert len(loop.timesteps) == 5
    scheduler.set_timesteps(5)
    assert loop.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma))
    assert loop.init_noise_sigma > 1.0


def test_unet_output_conventions():
    """Tensor, `.sample` and tuple outputs give the same result."""
    mlp = tiny_mlp()

    class Out:
        def __init__(self, sample):
            self.sample = sample

    latents = torch.randn(4, 2)
    outs = []
    for wrap in (lambda y: y, Out, lambda y: (y,)):
        loop = sampling_loop(lambda x, t, wrap=wrap: wrap(mlp(x, t)), diffusers.DDIMScheduler(), 4)
        with torch.no_grad():
            outs.append(loop(latents))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


# One graph, periodic --------------------------------------------------------------------------------------------


def _explain_periodic(loop, latents, steps, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(loop)(latents, **kwargs)
    torch._dynamo.reset()
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0, explanation.break_reasons
    stem, segments = step_segments(explanation.graphs[0], steps)
    for k, segment in enumerate(segments[1:], 1):
        assert segment == segments[0], f"step {k} differs from step 0"
    assert {target for _, target in stem} <= {torch.zeros_like, torch.stack}  # only the noise stacking
    return explanation.graphs[0], segments[0]


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_unet_loop_is_one_periodic_graph(name):
    loop = sampling_loop(tiny_unet(), SCHEDULERS[name](), 3)
    _explain_periodic(loop, torch.randn(2, 2, 8, 8), 3, generator=gen())


@pytest.mark.parametrize("case", ["ddim", "ddim-eta-clipped-eps", "ddpm", "ddpm-noclip-v-large", "euler",
                                  "euler-churn", "dpm++2m", "dpm++3m"])
def test_mlp_loop_is_one_periodic_graph(case):
    name, cfg, kwargs = MLP_CASES[case]
    loop = sampling_loop(tiny_mlp(), SCHEDULERS[name](**cfg), 5, **kwargs)
    gm, segment = _explain_periodic(loop, torch.randn(6, 2), 5, generator=gen())
    per_step = [n for n in gm.graph.nodes if n.target is torch.full]
    assert len({n.args[1] for n in per_step}) == 5  # the timestep is a per-step Python constant of torch.full
    if loop.plan.stochastic:
        getitems = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].name == "noise"]
        assert [n.args[1] for n in getitems] == list(range(5))


def test_compiled_loop_matches_eager_noise():
    """Under torch.compile the noise is drawn outside the graph: same sample as eager, with or without generator."""
    mlp = tiny_mlp()
    latents = torch.randn(6, 2)
    loop = sampling_loop(mlp, diffusers.DDPMScheduler(), 5)
    torch._dynamo.reset()
    compiled = torch.compile(loop, backend="eager")
    with torch.no_grad():
        ref = reference_loop(mlp, diffusers.DDPMScheduler(), 5, latents, generator=gen())
        out = compiled(latents, generator=gen())
        torch.manual_seed(11)
        ref_global = reference_loop(mlp, diffusers.DDPMScheduler(), 5, latents)
        torch.manual_seed(11)
        out_global = compiled(latents)
    torch._dynamo.reset()
    assert_close_rel(out, ref)
    assert_close_rel(out_global, ref_global)


@pytest.mark.parametrize("cfg,history", [({}, 1), ({"solver_order": 3}, 2), ({"solver_order": 1}, 0)])
def test_multistep_plan_reads_the_fewest_previous_predictions(cfg, history):
    loop = sampling_loop(tiny_mlp(), diffusers.DPMSolverMultistepScheduler(**cfg), 10)
    assert loop.plan.history == history
    assert all(len(s.hist_coefs) == history for s in loop.plan.steps)
    # warm-up: the first step is first order (no earlier prediction to read)
    assert all(c == 0.0 for c in loop.plan.steps[0].hist_coefs)


def test_multistep_plan_is_deterministic():
    """The plan is fitted by least squares; LAPACK's default driver once returned garbage at random on the
    warm-up steps' rank-deficient systems, so about one plan in twenty read the wrong history."""
    plans = [sampling_loop(tiny_mlp(), diffusers.DPMSolverMultistepScheduler(solver_order=3), 12).plan
             for _ in range(60)]
    assert all(p == plans[0] for p in plans)
    assert plans[0].history == 2


@pytest.mark.parametrize("case", ["dpm++2m", "dpm++3m"])
def test_compiled_multistep_loop_is_one_chain_matching_diffusers(case):
    """DPM-Solver++ carries its previous data predictions: one chain with several carried states, solved
    in parallel, with diffusers' answer."""
    import pcr_compile

    name, cfg, _ = MLP_CASES[case]
    mlp = tiny_mlp()
    latents = torch.randn(6, 2)
    loop = sampling_loop(mlp, SCHEDULERS[name](**cfg), 12)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = reference_loop(mlp, SCHEDULERS[name](**cfg), 12, latents)
        with pcr_compile.record_solves() as solves:
            out = torch.compile(loop, backend="deeppcr", options={"mode": "parallel", "strict": True})(latents)
    torch._dynamo.reset()
    assert_close_rel(out, ref)
    [solve] = solves
    assert solve.length >= 11 and not solve.fell_back
    [chain] = pcr_compile.explain(loop, latents, options={"mode": "parallel"}).chains
    assert len(chain.state_shapes) == 1 + loop.plan.history


def test_multistep_config_giving_non_finite_values_is_a_clear_error():
    # 'leading' spacing with steps_offset=1 starts at timestep 1000, past the 1000 training steps: diffusers'
    # own loop returns NaN here.
    sched = diffusers.DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="non-finite values at step 1 .timestep 999. of 999"):
        sampling_loop(tiny_mlp(), sched, 999)


def test_stochastic_multistep_is_unsupported():
    with pytest.raises(NotImplementedError, match="sde-dpmsolver"):
        sampling_loop(tiny_mlp(), diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), 5)


# Arguments -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["PNDMScheduler", "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_unsupported_scheduler(cls):
    with pytest.raises(NotImplementedError, match=f"{cls}.*DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, "
                                                  "DPMSolverMultistepScheduler"):
        sampling_loop(tiny_mlp(), getattr(diffusers, cls)(), 5)


def test_subclass_and_foreign_objects_are_unsupported():
    class MyDDIM(diffusers.DDIMScheduler):
        pass

    with pytest.raises(NotImplementedError, match="MyDDIM"):
        sampling_loop(tiny_mlp(), MyDDIM(), 5)
    with pytest.raises(NotImplementedError, match="object"):
        sampling_loop(tiny_mlp(), object(), 5)


@pytest.mark.parametrize("steps", [0, -3, 2.0, "5", True, None])
def test_bad_num_inference_steps(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling_loop(tiny_mlp(), diffusers.DDIMScheduler(), steps)


@pytest.mark.parametrize("name, cfg, option", [
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddpm", {"thresholding": True}, "thresholding"),
    ("ddpm", {"variance_type": "learned_range"}, "variance_type"),
    ("ddpm", {"variance_type": "fixed_large_log"}, "variance_type"),
    # zero terminal SNR with epsilon: 1 / sqrt(alphas_cumprod) at the first step (was ZeroDivisionError)
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "prediction_type='epsilon'"),
    ("ddpm", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "prediction_type='epsilon'"),
])
def test_unsupported_config(name, cfg, option):
    with pytest.raises(NotImplementedError, match=option):
        sampling_loop(tiny_mlp(), SCHEDULERS[name](**cfg), 5)


def test_ddim_eta_beyond_the_variance_is_a_clear_error():
    """eta = 1.5 asks for more noise than a DDIM step has: diffusers' step gives NaN, sampling_loop said only
    'math domain error'."""
    unet = tiny_mlp()
    with torch.no_grad():
        ref = reference_loop(unet, SCHEDULERS["ddim"](), 10, torch.randn(4, 2), generator=gen(),
                             step_kwargs={"eta": 1.5})
    assert not torch.isfinite(ref).all()
    with pytest.raises(ValueError, match=r"eta=1.5 .* Use eta in \[0, 1\]"):
        sampling_loop(unet, SCHEDULERS["ddim"](), 10, eta=1.5)
    sampling_loop(unet, SCHEDULERS["ddim"](), 10, eta=1.0)  # the DDPM posterior: fine


def test_unknown_step_kwarg():
    with pytest.raises(TypeError, match="eta"):
        sampling_loop(tiny_mlp(), diffusers.EulerDiscreteScheduler(), 5, eta=0.5)


@pytest.mark.parametrize("name,kwargs,exc,match", [
    ("ddim", {"eta": float("nan")}, ValueError, "eta must be finite"),  # was a silent all-NaN sample
    ("ddim", {"eta": None}, TypeError, "eta must be a real number"),  # was "unsupported operand type(s)"
    ("ddim", {"eta": "0.5"}, TypeError, "eta must be a real number"),
    ("ddim", {"use_clipped_model_output": "yes"}, TypeError, "use_clipped_model_output must be a bool"),
    ("euler", {"s_churn": float("nan")}, ValueError, "s_churn must be finite"),
    ("euler", {"s_noise": None}, TypeError, "s_noise must be a real number"),
])
def test_bad_step_kwarg_values(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sampling_loop(tiny_mlp(), SCHEDULERS[name](), 5, **kwargs)


def test_step_kwarg_values_diffusers_takes():
    """A one-element tensor eta, use_clipped_model_output=None (what DDIMPipeline passes) and s_tmax=inf are
    fine, and give diffusers' samples."""
    mlp, latents = tiny_mlp(), torch.randn(4, 2)
    for name, kwargs in (("ddim", {"eta": torch.tensor(0.5), "use_clipped_model_output": None}),
                         ("euler", {"s_churn": 1.0, "s_tmax": float("inf")})):
        loop = sampling_loop(mlp, SCHEDULERS[name](), 5, **kwargs)
        with torch.no_grad():
            ref = reference_loop(mlp, SCHEDULERS[name](), 5, latents, generator=gen(), step_kwargs=kwargs)
            assert_close_rel(loop(latents * loop.init_noise_sigma, generator=gen()), ref)


def test_deterministic_loop_rejects_noise():
    latents = torch.randn(2, 2)
    loop = sampling_loop(tiny_mlp(), diffusers.DDIMScheduler(), 3)
    with pytest.raises(ValueError, match="deterministic"):
        loop(latents, noise=torch.zeros(3, 2, 2))


def test_imports_without_diffusers(monkeypatch):
    """The module imports with diffusers unavailable (loaded afresh under another name, diffusers blocked)."""
    import pcr_compile.diffusion as module

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError):
        import diffusers as _  # noqa: F401
    spec = importlib.util.spec_from_file_location("_diffusion_without_diffusers", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    assert fresh.SUPPORTED_SCHEDULERS == ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                          "DPMSolverMultistepScheduler")
    with pytest.raises(NotImplementedError, match="object"):
        fresh.sampling_loop(tiny_mlp(), object(), 3)
