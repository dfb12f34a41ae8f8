"""Diffusion sampler loops through backend="deeppcr": per-step constants lifted, Picard and sliding-window
solves, and diffusers pipelines through `pcr_compile.diffusion.sampling_loop`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err

import pcr_compile
from pcr_compile.models import DDIMSampler, MLPDenoiser

PARALLEL = {"mode": "parallel", "strict": True}


def compiled_run(model, *inputs, options=PARALLEL, **kwargs):
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=options)(*inputs, **kwargs)
    return y, solves


@pytest.mark.parametrize("steps", [10, 23])
def test_hand_written_ddim_loop_over_mlp_denoiser(steps):
    model = DDIMSampler(MLPDenoiser(hidden=32), steps=steps)
    x = torch.randn(16, 2)
    y, solves = compiled_run(model, x)
    with torch.no_grad():
        ref = model(x)
    assert rel_err(y, ref) < 1e-4
    [s] = solves
    assert s.length == steps and s.converged and not s.fell_back


def test_classifier_free_guidance_and_shared_conditioning():
    for guidance in (0.0, 3.0):  # one denoiser call per step, then two combined
        torch._dynamo.reset()
        model = DDIMSampler(MLPDenoiser(hidden=32, cond_dim=3), steps=12, guidance=guidance)
        x, cond = torch.randn(8, 2), torch.randn(8, 3)
        report = pcr_compile.explain(model, x, cond, options=PARALLEL)
        [c] = report.chains
        assert c.kind == "sampler" and c.length == 12
        assert c.invariant_inputs >= 7  # the denoiser's six parameters and the conditioning tensor
        y, solves = compiled_run(model, x, cond)
        with torch.no_grad():
            assert rel_err(y, model(x, cond)) < 1e-4
        assert solves[0].length == 12


@pytest.mark.parametrize("jacobian", ["identity", "dense"])
@pytest.mark.parametrize("window", [3, 5])
def test_sliding_window_matches_full_solve(window, jacobian):
    model = DDIMSampler(MLPDenoiser(hidden=32), steps=17)
    x = torch.randn(6, 2)
    y, solves = compiled_run(model, x, options={**PARALLEL, "window": window, "jacobian": jacobian})
    with torch.no_grad():
        assert rel_err(y, model(x)) < 1e-4
    [s] = solves
    assert s.converged and not s.fell_back and s.length == 17
    assert s.iterations >= -(-17 // window)  # every window position needs at least one update


MEMORY_CHILD = textwrap.dedent("""
    import json, re, sys, torch
    from pcr_compile.solver.newton import newton_forward

    def high_water_mib():  # peak resident memory of this process (Linux)
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    L, window, w = int(sys.argv[1]), int(sys.argv[2]), 1 << 18  # 1 MiB of state per step

    def evaluate(start, Zprev, need_A):  # a small, contractive 'denoiser step': z <- z + 0.05 (2 - z)
        return Zprev + 0.05 * (2.0 - Zprev), None

    z0 = torch.zeros(1, w)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark after the imports
        f.write("5")
    before = high_water_mib()
    Z, stats = newton_forward(z0, L, evaluate, lambda l, z: z + 0.05 * (2.0 - z), structure="identity", tol=1e-6,
                              max_iters=50, solve_dtype=torch.float32, window=window, keep_trajectory=False)
    peak = high_water_mib() - before
    print(json.dumps({"peak_mib": peak, "converged": stats.converged, "value": float(Z[-1, 0, 0])}))
""")


def _peak(L: int, window: int) -> dict:
    # A fixed mmap threshold makes glibc return freed blocks to the OS, so peak RSS follows live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(L), str(window)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_sliding_window_memory_grows_with_window_not_steps():
    short, long, wide = _peak(24, 4), _peak(72, 4), _peak(72, 16)
    assert all(r["converged"] for r in (short, long, wide))
    exact = 2.0 - 2.0 * 0.95 ** 72  # z_L of z <- z + 0.05 (2 - z) from 0
    assert abs(long["value"] - exact) < 1e-3 and abs(wide["value"] - exact) < 1e-3
    # 3x the steps at the same window: the same peak; 4x the window: clearly more (1 MiB per step).
    assert long["peak_mib"] < short["peak_mib"] + 4
    assert wide["peak_mib"] > long["peak_mib"] + 24
    assert long["peak_mib"] < 0.75 * 72  # a full trajectory alone would be 72 MiB


diffusers = pytest.importorskip("diffusers", reason="diffusers pipelines need the optional diffusers package")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def diffusers_reference(unet, scheduler, steps, latents, generator=None):
    """diffusers' own loop: `for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x)`."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(getattr(out, "sample", out), t, x, generator=generator).prev_sample
    return x


SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_diffusers_unet_sampling_loop_compiled_matches_diffusers(scheduler):
    from pcr_compile.diffusion import sampling_loop

    steps = 8
    unet = tiny_unet()
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = diffusers_reference(unet, getattr(diffusers, scheduler)(), steps, latents,
                                  generator=torch.Generator().manual_seed(1))
    loop = sampling_loop(unet, getattr(diffusers, scheduler)(), steps)
    report = pcr_compile.explain(loop, latents * loop.init_noise_sigma, options=PARALLEL)
    [c] = report.chains
    assert c.kind == "sampler" and c.length == steps and c.jacobian == "identity"  # image state: Picard
    y, solves = compiled_run(loop, latents * loop.init_noise_sigma, generator=torch.Generator().manual_seed(1))
    assert rel_err(y, ref) < 1e-4
    [s] = solves
    assert s.converged and s.jacobian == "identity"


def test_stochastic_ddpm_mlp_loop_with_pre_drawn_noise():
    from pcr_compile.diffusion import sampling_loop

    steps = 12
    torch.manual_seed(0)
    unet = MLPDenoiser(dim=2, hidden=32, emb=8).eval()
    latents = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = diffusers_reference(unet, diffusers.DDPMScheduler(), steps, latents,
                                  generator=torch.Generator().manual_seed(3))
    loop = sampling_loop(unet, diffusers.DDPMScheduler(), steps)
    y, solves = compiled_run(loop, latents, generator=torch.Generator().manual_seed(3))
    assert rel_err(y, ref) < 1e-4
    assert solves[0].length == steps and solves[0].converged


def test_unet_with_attention_blocks_is_batched_over_steps():
    """diffusers' attention blocks make group_norm see non-contiguous inputs, which vmap cannot batch; the
    template uses a composite group_norm instead, so the solve stays parallel (no fallback)."""
    from pcr_compile.diffusion import sampling_loop

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    latents = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    loop = sampling_loop(unet, diffusers.DDIMScheduler(), 8)
    with torch.no_grad():
        ref = loop(latents)
    y, solves = compiled_run(loop, latents)
    assert rel_err(y, ref) < 1e-4
    [s] = solves
    assert s.converged and not s.fell_back, s.reason
