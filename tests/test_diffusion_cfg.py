"""Classifier-free guidance in `pcr_compile.diffusion`: the Stable Diffusion denoising loop over a
`UNet2DConditionModel`, eager, compiled and by `parallel_sample` / `parallel_denoise`, against a hand-written copy of
`StableDiffusionPipeline.__call__`'s loop (diffusers 0.42, step 7) with the real `scheduler.step`.

`sd_reference` is the pipeline's loop line for line (the pipeline itself is tested, in a subprocess, by
`test_parallel_pipeline_wraps_stable_diffusion_pipeline`): `cat([latents] * 2)`, `scale_model_input`, the unet on
`cat([negative, positive])`, `chunk(2)`, the guidance combination, `rescale_noise_cfg`, `scheduler.step` with
`prepare_extra_step_kwargs`' eta and generator.
The exactness tests run in float64; the remaining difference (~1e-6 of the output's scale) is the scheduler's own
float32 coefficients (diffusers keeps `alphas_cumprod` in float32), against the loop's float64 ones.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from conftest import rel_err
from helpers import tiny_condition_unet

import pcr_compile
from pcr_compile.diffusion import Guidance, parallel_denoise, parallel_pipeline, parallel_sample, sampling_loop
from pcr_compile.diffusion.guidance import expand_conditioning

diffusers = pytest.importorskip("diffusers", reason="the guidance loop is tested against diffusers' schedulers")

SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(),  # clip_sample=True: the clamp term too
    "euler": lambda: diffusers.EulerDiscreteScheduler(),  # scale_model_input on the doubled batch
    "dpm": lambda: diffusers.DPMSolverMultistepScheduler(),  # carried data predictions
}
B, SEQ, DIM = 2, 3, 8  # latents (B, 2, 8, 8); prompt embeddings (B, SEQ, DIM), DIM = cross_attention_dim


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    """diffusers' `pipeline_stable_diffusion.rescale_noise_cfg`, copied (the module imports transformers)."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def sd_reference(unet, scheduler, steps, latents, prompt_embeds, negative_prompt_embeds, guidance_scale,
                 guidance_rescale=0.0, generator=None, eta=0.0):
    """`StableDiffusionPipeline.__call__` from `prepare_latents` (given latents) to `output_type="latent"`."""
    do_cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    if do_cfg:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)  # prepare_extra_step_kwargs
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=None,
                          cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if do_cfg and guidance_rescale > 0.0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents


def inputs(dtype=torch.float64, batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 2, 8, 8, generator=g, dtype=dtype)
    return latents, torch.randn(batch, SEQ, DIM, generator=g, dtype=dtype), torch.randn(batch, SEQ, DIM,
                                                                                        generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def unet64():
    torch.manual_seed(0)
    return tiny_condition_unet().double()


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


# (a) the eager loop is the pipeline's loop --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("guidance_scale,guidance_rescale", [(7.5, 0.0), (4.0, 0.7)])
def test_eager_guided_loop_matches_the_sd_pipeline_loop(unet64, name, guidance_scale, guidance_rescale):
    latents, pos, neg = inputs()
    steps = 5
    with torch.no_grad():
        ref = sd_reference(unet64, SCHEDULERS[name](), steps, latents, pos, neg, guidance_scale, guidance_rescale)
        loop = sampling_loop(unet64, SCHEDULERS[name](), steps, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale)
        out = loop(latents * loop.init_noise_sigma, encoder_hidden_states=torch.cat([neg, pos]))
        unguided = sd_reference(unet64, SCHEDULERS[name](), steps, latents, pos, neg, 1.0)
    assert loop.guidance == Guidance(guidance_scale, guidance_rescale)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(unguided, ref) > 1e-2  # the guidance really changes the sample: the test can fail


def test_eager_guided_stochastic_ddim_matches_with_the_same_generator(unet64):
    latents, pos, neg = inputs()
    with torch.no_grad():
        ref = sd_reference(unet64, diffusers.DDIMScheduler(), 5, latents, pos, neg, 7.5, generator=gen(), eta=0.5)
        loop = sampling_loop(unet64, diffusers.DDIMScheduler(), 5, guidance_scale=7.5, eta=0.5)
        out = loop(latents, generator=gen(), encoder_hidden_states=torch.cat([neg, pos]))
    assert loop.plan.stochastic
    assert rel_err(out, ref) < 1e-5


# (d) guidance_scale <= 1: no guidance, as do_classifier_free_guidance ----------------------------------------


@pytest.mark.parametrize("guidance_scale", [1.0, 0.5, 1])
def test_guidance_scale_at_most_one_is_the_plain_loop(unet64, guidance_scale):
    latents, pos, neg = inputs()
    calls = []
    unet64_hook = unet64.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            ref = sd_reference(unet64, diffusers.DDIMScheduler(), 4, latents, pos, neg, guidance_scale, 0.7)
            loop = sampling_loop(unet64, diffusers.DDIMScheduler(), 4, guidance_scale=guidance_scale,
                                 guidance_rescale=0.7)
            calls.clear()
            out = loop(latents, encoder_hidden_states=pos)
            plain = sampling_loop(unet64, diffusers.DDIMScheduler(), 4)(latents, encoder_hidden_states=pos)
    finally:
        unet64_hook.remove()
    assert loop.guidance is None
    assert calls[:4] == [B] * 4  # one batch of B per step, not 2 B
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert rel_err(out, ref) < 1e-5


def test_guidance_embedding_unet_is_never_guided():
    """diffusers runs no CFG for a UNet with time_cond_proj_dim (LCM); the loop neither."""
    fake = types.SimpleNamespace(config=types.SimpleNamespace(time_cond_proj_dim=4))
    unet = lambda x, t, **kw: x  # noqa: E731
    unet.config = fake.config
    assert sampling_loop(unet, diffusers.DDIMScheduler(), 4, guidance_scale=7.5).guidance is None
    with pytest.raises(NotImplementedError, match="time_cond_proj_dim"):
        parallel_denoise(unet, diffusers.DDIMScheduler(), torch.zeros(1, 2, 8, 8), torch.zeros(1, SEQ, DIM),
                         torch.zeros(1, SEQ, DIM), num_inference_steps=4)


# (b) one graph, one sampler chain; compiled -------------------------------------------------------------------


def test_guided_loop_is_one_graph_and_one_sampler_chain():
    torch.manual_seed(0)
    unet = tiny_condition_unet()
    latents, pos, neg = inputs(torch.float32)
    loop = sampling_loop(unet, diffusers.DDIMScheduler(), 8, guidance_scale=7.5, guidance_rescale=0.5)
    emb = torch.cat([neg, pos])
    report = pcr_compile.explain(loop, latents, encoder_hidden_states=emb, options={"mode": "parallel"})
    assert len(report.graphs) == 1 and not report.graph_breaks, report.graph_breaks
    ops = report.graphs[0].ops
    assert ops["full"] == 8 and ops["std"] == 2 * 8  # a timestep and rescale_noise_cfg's two stds per step
    [chain] = report.chains
    assert chain.kind == "sampler" and chain.length == 8 and chain.decision == "parallel"
    assert tuple(chain.state_shapes[0]) == tuple(latents.shape)  # the state is the B latents, not the 2 B batch


@pytest.mark.slow  # a CPU compile of a UNet sampler: ~10 s with a warm Inductor cache, ~90 s cold
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_compiled_guided_loop_is_one_parallel_solve(name):
    torch.manual_seed(0)
    unet = tiny_condition_unet()
    latents, pos, neg = inputs(torch.float32)
    loop = sampling_loop(unet, SCHEDULERS[name](), 8, guidance_scale=7.5, guidance_rescale=0.5)
    x, emb = latents * loop.init_noise_sigma, torch.cat([neg, pos])
    torch._dynamo.reset()
    with torch.no_grad():
        ref = sd_reference(unet, SCHEDULERS[name](), 8, latents, pos, neg, 7.5, 0.5)
        eager = loop(x, encoder_hidden_states=emb)
        with pcr_compile.record_solves() as solves:
            out = torch.compile(loop, backend="deeppcr", options={"mode": "parallel", "strict": True})(
                x, encoder_hidden_states=emb)
    torch._dynamo.reset()
    [s] = solves
    assert s.length == 8 and s.converged and not s.fell_back, s.reason
    assert s.evaluations + s.sequential_steps <= 8
    # float32, guidance 7.5 amplifies the batched evaluation's rounding: ~1e-4 of the output's scale
    assert rel_err(out, eager) < 1e-3
    assert rel_err(out, ref) < 1e-3


# (c) parallel_sample and parallel_denoise ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("jacobian,window,batch", [("auto", 0, B), ("identity", 3, 1)])
def test_parallel_sample_of_a_guided_loop_matches_eager(unet64, name, jacobian, window, batch):
    """Batched rounds fold (steps x candidates x B) samples into one unet call of twice that many rows; batch 1
    has conditioning of batch 2, which must still be read as the doubled (negative, positive) pair."""
    latents, pos, neg = inputs(batch=batch)
    loop = sampling_loop(unet64, SCHEDULERS[name](), 6, guidance_scale=7.5, guidance_rescale=0.3)
    x, emb = latents * loop.init_noise_sigma, torch.cat([neg, pos])
    with torch.no_grad():
        eager = loop(x, encoder_hidden_states=emb)
        out, stats = parallel_sample(loop, x, jacobian=jacobian, window=window, encoder_hidden_states=emb)
    assert stats.evaluations + stats.sequential_steps <= 6
    assert rel_err(out, eager) < 1e-7


def test_parallel_denoise_matches_the_pipeline_loop(unet64):
    _, pos, neg = inputs()
    rounds = []
    with torch.no_grad():
        out, stats = parallel_denoise(unet64, diffusers.EulerDiscreteScheduler(), None, pos, neg,
                                      guidance_scale=6.0, guidance_rescale=0.5, num_inference_steps=6,
                                      generator=gen(), on_round=lambda done, steps: rounds.append(done))
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((B, 2, 8, 8), generator=gen(), dtype=torch.float64)  # prepare_latents' draw
        ref = sd_reference(unet64, diffusers.EulerDiscreteScheduler(), 6, latents, pos, neg, 6.0, 0.5)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-5
    assert rounds and rounds[-1] == 6 and len(rounds) == stats.evaluations


def test_parallel_denoise_stochastic_ddim_draws_as_the_pipeline(unet64):
    """Initial latents first, then each step's noise, from one generator: the pipeline's order."""
    _, pos, neg = inputs()
    with torch.no_grad():
        out, _ = parallel_denoise(unet64, diffusers.DDIMScheduler(), None, pos, neg, num_inference_steps=5,
                                  generator=gen(), eta=1.0)
        g = gen()
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((B, 2, 8, 8), generator=g, dtype=torch.float64)
        ref = sd_reference(unet64, diffusers.DDIMScheduler(), 5, latents, pos, neg, 7.5, generator=g, eta=1.0)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("scheduler", [
    lambda: diffusers.EulerAncestralDiscreteScheduler(),  # stochastic: noise from the generator inside step
    lambda: diffusers.DDIMScheduler(thresholding=True, sample_max_value=0.5),
])
def test_parallel_denoise_runs_what_sampling_loop_declines_as_the_pipeline(unet64, scheduler, caplog):
    """A diffusers scheduler sampling_loop does not support is the pipeline's loop run sequentially, with a
    warning and the fallback in the stats (it raised NotImplementedError); the scheduler is not modified."""
    _, pos, neg = inputs()
    sched = scheduler()
    with torch.no_grad(), caplog.at_level("WARNING", logger="pcr_compile.diffusion.pipelines"):
        out, st = parallel_denoise(unet64, sched, None, pos, neg, guidance_scale=5.0, guidance_rescale=0.3,
                                   num_inference_steps=4, generator=gen())
        g = gen()
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((B, 2, 8, 8), generator=g, dtype=torch.float64)
        ref = sd_reference(unet64, scheduler(), 4, latents, pos, neg, 5.0, 0.3, generator=g)
    assert rel_err(out, ref) < 1e-12
    assert st.fell_back and "does not support" in st.reason and st.depth == 4 and "sequentially" in caplog.text
    assert sched.num_inference_steps is None


def test_parallel_denoise_without_guidance_takes_no_negative(unet64):
    latents, pos, _ = inputs()
    with torch.no_grad():
        out, _ = parallel_denoise(unet64, diffusers.DDIMScheduler(), latents, pos, guidance_scale=1.0,
                                  num_inference_steps=4)
        ref = sd_reference(unet64, diffusers.DDIMScheduler(), 4, latents, pos, None, 1.0)
    assert rel_err(out, ref) < 1e-5


def test_expand_conditioning_lines_up_with_the_doubled_batch():
    neg, pos = torch.arange(2.0).reshape(2, 1), torch.arange(10.0, 12.0).reshape(2, 1)
    emb = torch.cat([neg, pos])  # (2B, 1), B = 2
    out = expand_conditioning({"e": emb, "nested": {"e": emb}, "s": 3.0}, 2, 3, Guidance(7.5))
    want = torch.cat([neg.repeat(3, 1), pos.repeat(3, 1)])  # cat([X, X]) of 3 x B rows: negatives, then positives
    torch.testing.assert_close(out["e"], want)
    torch.testing.assert_close(out["nested"]["e"], want)
    assert out["s"] == 3.0
    torch.testing.assert_close(expand_conditioning(pos, 2, 3, None), pos.repeat(3, 1))


# (e) errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": "7.5"}, "guidance_scale"), ({"guidance_scale": True}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_rescale": -0.1}, "guidance_rescale"),
    ({"guidance_rescale": None}, "guidance_rescale"),
])
def test_bad_guidance_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling_loop(lambda x, t, **kw: x, diffusers.DDIMScheduler(), 4, **kwargs)


def test_guided_loop_rejects_conditioning_of_the_wrong_batch(unet64):
    latents, pos, _ = inputs()
    loop = sampling_loop(unet64, diffusers.DDIMScheduler(), 4, guidance_scale=7.5)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        loop(latents, encoder_hidden_states=pos)  # B rows, not cat([negative, positive])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        parallel_sample(loop, latents, encoder_hidden_states=pos)


def test_parallel_denoise_errors(unet64):
    latents, pos, neg = inputs()
    sched = diffusers.DDIMScheduler()
    short = neg[:1]
    cases = [
        (ValueError, "negative_prompt_embeds", dict(latents=latents, prompt_embeds=pos)),
        (ValueError, "negative_prompt_embeds", dict(latents=latents, prompt_embeds=pos, negative_prompt_embeds=short)),
        (TypeError, "negative_prompt_embeds", dict(latents=latents, prompt_embeds=pos, negative_prompt_embeds=[1])),
        (ValueError, "prompt_embeds", dict(latents=latents, prompt_embeds=pos[:, 0], negative_prompt_embeds=neg[:, 0])),
        (TypeError, "prompt_embeds", dict(latents=latents, prompt_embeds="a cat", negative_prompt_embeds=neg)),
        (ValueError, "latents", dict(latents=latents[:1], prompt_embeds=pos, negative_prompt_embeds=neg)),
        (TypeError, "latents", dict(latents=[0.0], prompt_embeds=pos, negative_prompt_embeds=neg)),
        (ValueError, "generators", dict(latents=None, prompt_embeds=pos, negative_prompt_embeds=neg,
                                        generator=[gen()])),
        (TypeError, "solver options", dict(latents=latents, prompt_embeds=pos, negative_prompt_embeds=neg,
                                           tolerance=1e-3)),
        # these failed inside the unet's first call (a matmul / conv shape or dtype error)
        (ValueError, r"prompt_embeds must be \(batch, seq, 8\) .*cross_attention_dim",
         dict(latents=latents, prompt_embeds=pos[..., :5], negative_prompt_embeds=neg[..., :5])),
        (ValueError, "prompt_embeds are torch.float32 but the unet is torch.float64",
         dict(latents=None, prompt_embeds=pos.float(), negative_prompt_embeds=neg.float())),
        (ValueError, r"latents must be \(batch, 2, \.\.\.\)", dict(latents=latents[:, :1], prompt_embeds=pos,
                                                                 negative_prompt_embeds=neg)),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            parallel_denoise(unet64, sched, num_inference_steps=4, **kw)
    with pytest.raises(ValueError, match="pass latents"):
        parallel_denoise(lambda x, t, **kw: x, sched, None, pos, neg, num_inference_steps=4)


def test_parallel_pipeline_refuses_other_stable_diffusion_pipelines():
    class StableDiffusionImg2ImgPipeline:  # stands for any SD pipeline but text-to-image
        pass

    with pytest.raises(NotImplementedError, match="parallel_denoise"):
        parallel_pipeline(StableDiffusionImg2ImgPipeline())
    with pytest.raises(TypeError, match="solver options"):
        parallel_pipeline(diffusers.DDIMPipeline(unet=tiny_condition_unet(), scheduler=diffusers.DDIMScheduler()),
                          tolerance=1e-3)


def test_parallel_pipeline_wraps_stable_diffusion_pipeline():
    """diffusers' own StableDiffusionPipeline (tiny UNet and VAE, prompt embeddings given) against
    `parallel_pipeline(pipe)` from the same generators: the same images for DDIM (eta, guidance_rescale,
    num_images_per_prompt), Euler without guidance, DPM-Solver++, DDPM with a generator per image, given latents,
    output types pt / latent, return_dict=False; an unsupported scheduler (PNDM) and a per-step callback run the
    pipeline itself. In a subprocess: where transformers is missing, the pipeline module is imported behind a
    stand-in (sd_pipeline_check.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("sd_pipeline_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["wrapper"] == "ParallelStableDiffusionPipeline" and res["isinstance"] and res["scheduler_swapped"]
    cases = res["cases"]
    for name, case in cases.items():
        assert case["max_abs_diff"] <= 1e-5 * max(1.0, case["scale"]), (name, case)
        if name == "pndm":  # the pipeline itself ran, and last_stats says so (it was None)
            assert case["max_abs_diff"] == 0.0 and case["fell_back"] and case["rounds"] == 0
            assert case["depth"] >= 8 and "PNDMScheduler" in case["reason"], case  # PNDM: more timesteps than steps
        else:
            assert case["converged"] and 1 <= case["rounds"] <= 8, (name, case)  # never more rounds than steps
    assert cases["ddim-eta-rescale-2-per-prompt"]["shape"] == [4, 16, 16, 3]  # 2 prompts x 2 images, HWC numpy
    assert cases["ddim-given-latents-pt"]["shape"] == [2, 3, 16, 16]
    assert cases["ddim-latent-tuple"]["tuple"] and cases["ddim-latent-tuple"]["shape"] == [2, 2, 8, 8]
    assert res["callback_calls"] == [0, 1, 2]  # sequential, every step called
    cb = res["callback_stats"]
    assert cb["fell_back"] and cb["depth"] == 3 and "callback_on_step_end" in cb["reason"], cb
    # the pipeline's own progress bar: total = steps, one tick per round, closed
    assert res["bar"] == [["total", 6], *[1] * res["bar_rounds"], "closed"] and 1 <= res["bar_rounds"] <= 6
    assert res["errors"]["unknown"].startswith("TypeError") and "stepz" in res["errors"]["unknown"]
    assert res["errors"]["height"].startswith("ValueError") and "divisible by 8" in res["errors"]["height"]
    # the pipeline's properties after a parallel call, as after its own (they raised AttributeError)
    assert res["properties"] == {"num_timesteps": 3, "guidance_scale": 3.0, "guidance_rescale": 0.25,
                                 "do_classifier_free_guidance": True, "interrupt": False}
