"""A sweep of what diffusers users do with the pipeline wrappers and compiled loops (second round).

Each test is one finding: a scheduler the pipeline's loop cannot pass its keywords to (a clear error naming the
pipeline and the scheduler), the end of the pipelines' `__call__` (`maybe_free_model_hooks`), an integral float
step count. (Accumulations into a buffer in a compiled loop: test_functionalize.py; the Stable Diffusion
pipeline's properties: test_diffusion_cfg.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcr_compile.diffusion import parallel_pipeline

diffusers = pytest.importorskip("diffusers", reason="the wrappers wrap diffusers pipelines")


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _pair(unet, pipeline, scheduler):
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = scheduler  # swapped in after construction (DDIMPipeline's __init__ converts to DDIM)
    pipe.set_progress_bar_config(disable=True)
    return pipe, parallel_pipeline(pipe)


@pytest.mark.parametrize("pipeline,scheduler,missing", [
    ("DDIMPipeline", "EulerDiscreteScheduler", "eta=, use_clipped_model_output="),
    ("DDIMPipeline", "DPMSolverMultistepScheduler", "eta=, use_clipped_model_output="),
    ("DDIMPipeline", "DDPMScheduler", "eta=, use_clipped_model_output="),
    ("DDPMPipeline", "UniPCMultistepScheduler", "generator="),
])
def test_a_scheduler_the_pipelines_loop_cannot_call_is_a_clear_error(unet, pipeline, scheduler, missing):
    """DDIMPipeline with an Euler / DPM-Solver / DDPM scheduler swapped in: diffusers' own pipeline fails on its
    first step (step() takes no eta); the wrapper's error named sampling_loop ("sampling_loop with
    EulerDiscreteScheduler got unexpected keyword arguments ['eta']"), not the pipeline or what to do."""
    pipe, par = _pair(unet, pipeline, getattr(diffusers, scheduler).from_config(diffusers.DDPMScheduler().config))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        pipe(num_inference_steps=2, output_type="np")
    with pytest.raises(TypeError, match=f"{pipeline}'s loop passes {missing} to scheduler.step, which "
                                        f"{scheduler}.step does not take") as err:
        par(num_inference_steps=2, output_type="np")
    assert "sampling_loop" not in str(err.value)
    assert ("DDIMScheduler.from_config" in str(err.value)) == (pipeline == "DDIMPipeline")
    assert par.last_stats is None


@pytest.mark.parametrize("pipeline,scheduler", [("DDIMPipeline", "DDIMScheduler"), ("DDPMPipeline", "DDPMScheduler"),
                                                ("DDPMPipeline", "EulerAncestralDiscreteScheduler")])
def test_the_call_ends_with_maybe_free_model_hooks(unet, pipeline, scheduler):
    """diffusers' pipelines end `__call__` with `maybe_free_model_hooks()` (it offloads the models again under
    `enable_model_cpu_offload` and resets stateful hooks); the parallel path never called it. Once per call, on
    the parallel path and on the sequential fallback (ancestral Euler) alike, with the images unchanged."""
    pipe, par = _pair(unet, pipeline, getattr(diffusers, scheduler).from_config(diffusers.DDPMScheduler().config))
    calls = []
    pipe.maybe_free_model_hooks = lambda: calls.append(1)
    kw = dict(batch_size=2, num_inference_steps=3, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert len(calls) == 1
    out = par(generator=torch.Generator().manual_seed(0), **kw).images
    assert len(calls) == 2
    assert par.last_stats.fell_back == (scheduler == "EulerAncestralDiscreteScheduler")
    assert np.abs(out - ref).max() < 1e-4


def test_an_integral_float_step_count_runs_as_the_pipeline_runs_it(unet):
    """`num_inference_steps=3.0` (read from a config file): DDPMPipeline samples with it; the wrapper raised
    "num_inference_steps must be a positive int". It is 3 steps, solved in parallel."""
    pipe, par = _pair(unet, "DDPMPipeline", diffusers.DDPMScheduler())
    kw = dict(batch_size=2, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3.0, **kw).images
    out = par(generator=torch.Generator().manual_seed(0), num_inference_steps=3.0, **kw).images
    assert np.abs(out - ref).max() < 1e-4 and not par.last_stats.fell_back and par.last_stats.depth <= 3
    with pytest.raises(ValueError, match="positive int"):
        par(num_inference_steps=2.5, **kw)


def test_a_unet_whose_output_is_not_the_samples_shape_is_a_clear_error():
    """A UNet2DModel with out_channels = 2 x in_channels (trained with a learned variance) under a fixed-variance
    DDPMScheduler: the solve failed inside its first batched step ("shape '[2, 1, 1, 8, 8]' is invalid")."""
    from pcr_compile.diffusion import parallel_sample, sampling_loop

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, add_attention=False,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    loop = sampling_loop(unet, diffusers.DDPMScheduler(), 2)
    with pytest.raises(ValueError, match="outputs 2 channels for 1 input channels.*learned variance"):
        parallel_sample(loop, torch.randn(1, 1, 8, 8))
