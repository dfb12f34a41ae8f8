"""Graph-break-free diffusion sampling loops for diffusers schedulers.

diffusers' `scheduler.step` cannot be captured as one graph: `DDIMScheduler.step` branches on the previous
timestep and guards on `timestep.item()`, `EulerDiscreteScheduler` looks its step index up with `nonzero()`, and
`DDPMScheduler` does both. So Dynamo breaks the graph or recompiles at every step, and the backend never sees the
sampler as one chain. `sampling_loop` reads the scheduler once, precomputes every per-step coefficient as a Python
float, and returns a module whose forward is a plain loop of tensor arithmetic: every step is the *same* ops

    t    = torch.full((), t_i, dtype=timestep dtype)            # t_i: Python int (DDIM/DDPM) or float (Euler)
    xin  = x * s_i                                              # Euler only: scale_model_input
    m    = unet(xin, t, **unet_kwargs)                          # .sample / [0] taken when not a tensor
    x'   = x * a_i + m * b_i                                    # the linear part of step()
         + clamp(x * p_i + m * q_i, -r, r) * c_i                # only when config.clip_sample
         + noise[i] * d_i                                       # only for stochastic samplers

with different Python constants (float64 values, applied in the latents' dtype), which is what
`torch.compile(loop, backend="deeppcr")` lifts into per-step inputs. Which terms exist is decided once for the
whole loop (a term whose constant is zero at every step is left out; one that is zero at some steps stays, with
constant 0.0 there), so no step has ops of its own. In the captured graph a step starts at its `torch.full`
node; the per-step values are the fill value of that node, the float second operand of the `operator.mul`
nodes, and the int index of the `operator.getitem(noise, i)` node; the clamp bounds are the same at every step.
In eager mode the loop reproduces `for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t,
x).prev_sample` (with `scale_model_input` for Euler) to float rounding.

Supported: `DDIMScheduler` (any eta; `use_clipped_model_output`), `DDPMScheduler` (variance types fixed_small,
fixed_small_log, fixed_large) and `EulerDiscreteScheduler` (with `s_churn` / `s_tmin` / `s_tmax` / `s_noise`);
prediction types epsilon, v_prediction and sample; `clip_sample`; and whatever `set_timesteps` derives from the
config (timestep_spacing, steps_offset, set_alpha_to_one, Karras / exponential sigmas, zero-SNR rescaling ...).
`thresholding` and learned variances raise `NotImplementedError`.

`DPMSolverMultistepScheduler` (algorithm types dpmsolver++ and dpmsolver, any solver_order, with diffusers' own
warm-up and final-step order switching) adds one term per previous data prediction it reads:

    x'   = ... + h_1 * c_1 + ... + h_K * c_K                    # h_k: the data prediction of k steps back
    h_1' = x * p + m * q;  h_k' = h_(k-1).clone()               # carried along (zeros before the first step)

Its coefficients are read off the scheduler: `step` is linear in the sample and the model outputs, so one run
on basis vectors gives every sample in terms of them, and each step is solved for the fewest previous
predictions that reproduce it (see `_plan_multistep`).

Classifier-free guidance (`sampling_loop(..., guidance_scale=7.5, guidance_rescale=...)`, Stable Diffusion's
loop, ``pcr_compile/diffusion/guidance.py``) puts the guidance into the denoiser part of every step:

    m    = uncond + g * (text - uncond),  (uncond, text) = unet(cat([xin, xin]), t, ...).chunk(2)
         (then diffusers' rescale_noise_cfg when guidance_rescale > 0)

with `encoder_hidden_states = cat([negative_prompt_embeds, prompt_embeds])`; `parallel_denoise` runs the
pipeline's denoising loop from prompt embeddings.

Stochastic samplers (DDPM, DDIM with eta > 0, Euler with churn) pre-draw all per-step noise before the first
step, one `randn_tensor(latents.shape, generator=...)` per step that diffusers' `step` would draw, in the same
order, so the same `torch.Generator` seed gives the same samples as diffusers. Steps that draw nothing get zeros.
The draws run eagerly (`torch.compiler.disable`) before any graph op, so under `torch.compile` they become graph
inputs, stacked by `torch.stack` into `noise` at the head of the graph, at no graph break, and a compiled loop
draws the same noise as an eager one (from the generator, or from the global RNG when there is none).

References: Song et al., "Denoising Diffusion Implicit Models" (DDIM, arXiv 2010.02502); Ho et al., "Denoising
Diffusion Probabilistic Models" (arXiv 2006.11239); Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (Euler / churn, arXiv 2206.00364); Shih et al., "Parallel Sampling of
Diffusion Models" (ParaDiGMS, arXiv 2305.16317), the Picard iteration this loop is meant to feed.
diffusers is optional: nothing here imports it at module import time.
"""

from pcr_compile.diffusion.guidance import Guidance
from pcr_compile.diffusion.loop import SamplingLoop, sampling_loop
from pcr_compile.diffusion.parallel import parallel_sample
from pcr_compile.diffusion.pipelines import ParallelPipeline, parallel_denoise, parallel_pipeline
from pcr_compile.diffusion.plans import SUPPORTED_SCHEDULERS, SamplerPlan, StepCoefficients, noise_levels
from pcr_compile.diffusion.sd_pipeline import ParallelStableDiffusionPipeline

__all__ = ["SUPPORTED_SCHEDULERS", "Guidance", "ParallelPipeline", "ParallelStableDiffusionPipeline", "SamplerPlan",
           "SamplingLoop", "StepCoefficients", "noise_levels", "parallel_denoise", "parallel_pipeline",
           "parallel_sample", "sampling_loop"]
