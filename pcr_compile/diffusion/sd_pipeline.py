"""`parallel_pipeline(StableDiffusionPipeline)`: text-to-image Stable Diffusion with the denoising loop as one
parallel solve.

`ParallelStableDiffusionPipeline(pipe)(prompt, ...)` takes `StableDiffusionPipeline.__call__`'s arguments and
returns what it returns, running the pipeline's own steps around the loop: `check_inputs`, `encode_prompt`
(prompts or `prompt_embeds`, `num_images_per_prompt`, `clip_skip`, the LoRA scale of `cross_attention_kwargs`),
the initial latents drawn as `prepare_latents` draws them, then the denoising loop (classifier-free guidance,
`guidance_rescale`, `eta`) by `parallel_denoise`, then `vae.decode`, `run_safety_checker`,
`image_processor.postprocess` and `maybe_free_model_hooks`, and setting the call's state its properties read
(`guidance_scale`, `guidance_rescale`, `clip_skip`, `cross_attention_kwargs`, `num_timesteps`). So the images
equal the sequential pipeline's from the same generator, within the solve's tolerance.

What a parallel solve cannot take runs the pipeline itself instead, sequentially and exactly, with a warning
naming the reason (`last_stats.fell_back` is then True and `.reason` names it, as for
`parallel_pipeline`'s other wrappers): a scheduler or scheduler config `sampling_loop` does not
support (SD 1.x checkpoints default to `PNDMScheduler`: swap in `DDIMScheduler` / `EulerDiscreteScheduler` /
`DPMSolverMultistepScheduler` `.from_config(pipe.scheduler.config)` for the parallel solve), custom
`timesteps` / `sigmas`, IP-Adapter images, per-step callbacks (`callback_on_step_end`, the deprecated
`callback`: a parallel solve has no step order to call them in), and guidance-embedding UNets (LCM).

Only `StableDiffusionPipeline` itself is wrapped: img2img, inpainting, SDXL and the rest change the loop's
inputs (`added_cond_kwargs`, masked latents, a start step) and are refused with `NotImplementedError`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from pcr_compile.diffusion.loop import sampling_loop
from pcr_compile.diffusion.pipelines import PipelineWrapper, _check_solver_options, parallel_denoise, rounds_bar
from pcr_compile.diffusion.plans import SCHEDULERS, _scheduler_name
from pcr_compile.solver.sampler import SamplerStats

log = logging.getLogger(__name__)

# __call__ arguments the parallel solve cannot take, with the default under which they are absent.
_SEQUENTIAL_ONLY = {"timesteps": None, "sigmas": None, "ip_adapter_image": None, "ip_adapter_image_embeds": None,
                    "callback_on_step_end": None, "callback": None, "callback_steps": None}


class ParallelStableDiffusionPipeline(PipelineWrapper):
    """A `StableDiffusionPipeline` whose denoising loop is one parallel solve; see the module docstring.
    `solver_options` go to `parallel_sample` (tol, rule, accel, jacobian, history, window, max_iters); the
    stats of the last call are in `.last_stats`."""

    def __init__(self, pipe: Any, **solver_options: Any):
        if type(pipe).__name__ != "StableDiffusionPipeline" or not type(pipe).__module__.startswith("diffusers."):
            raise NotImplementedError(f"ParallelStableDiffusionPipeline wraps diffusers' StableDiffusionPipeline, "
                                      f"got {type(pipe).__name__}")
        _check_solver_options(solver_options, "parallel_pipeline")
        self.pipe, self.options, self.last_stats = pipe, dict(solver_options), None

    def _sequential_reason(self, steps: int, guidance_scale: float, guidance_rescale: float, eta: float,
                           extra: dict[str, Any]) -> str | None:
        """Why this call cannot be one parallel solve, or None; decided before anything is drawn from the
        generator, so the sequential pipeline then draws what it would have drawn."""
        for name, default in _SEQUENTIAL_ONLY.items():
            if extra.get(name, default) is not default:
                return f"{name} is given"
        if getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is not None:
            return "the unet has a guidance embedding (time_cond_proj_dim)"
        try:  # the loop parallel_denoise builds (on a copy of the scheduler)
            name = _scheduler_name(self.pipe.scheduler)
            step_kwargs = {"eta": eta} if "eta" in SCHEDULERS[name].step_kwargs else {}
            sampling_loop(self.pipe.unet, self.pipe.scheduler, steps, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, **step_kwargs)
        except NotImplementedError as e:
            return str(e)
        return None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int | None = 1,
                 eta: float = 0.0, generator: Any = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str | None = "pil", return_dict: bool = True,
                 cross_attention_kwargs: dict[str, Any] | None = None, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, **extra: Any):
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        self.last_stats = None  # a call that raises leaves no stats of an earlier call behind
        accepted = set(inspect.signature(type(pipe).__call__).parameters)
        unknown = sorted(k for k in extra if k not in _SEQUENTIAL_ONLY and k not in accepted
                         and k != "callback_on_step_end_tensor_inputs")
        if unknown:
            raise TypeError(f"StableDiffusionPipeline.__call__ got unexpected keyword arguments {unknown}")
        args = dict(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
                    guidance_rescale=guidance_rescale, clip_skip=clip_skip, **extra)
        reason = self._sequential_reason(num_inference_steps, guidance_scale, guidance_rescale, eta, extra)
        if reason is not None:
            log.warning("deeppcr: running the Stable Diffusion pipeline sequentially: %s", reason)
            out = pipe(**args)
            steps = len(pipe.scheduler.timesteps)
            self.last_stats = SamplerStats(fell_back=True, reason=f"sequential pipeline: {reason}",
                                           sequential_steps=steps, step_evaluations=steps)
            return out

        # 0-1: the pipeline's default size and its input checks
        if not height or not width:
            size = pipe.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            height, width = size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor
        pipe.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          None, None, None)
        # the call's state the pipeline's properties read (pipe.guidance_scale, .num_timesteps, ...), set as its
        # own __call__ sets it
        pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = guidance_scale, guidance_rescale, clip_skip
        pipe._cross_attention_kwargs, pipe._interrupt = cross_attention_kwargs, False
        # 2-3: the prompts encoded as the pipeline encodes them
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = pipe._execution_device
        do_cfg = guidance_scale > 1
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        # 5: the initial noise as prepare_latents draws it (parallel_denoise applies init_noise_sigma)
        n = batch_size * num_images_per_prompt
        shape = (n, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor,
                 int(width) // pipe.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {n}. Make sure the batch size matches the length of the "
                             "generators.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        else:
            latents = latents.to(device)
        # 7: the denoising loop, one round of the solve per progress-bar tick
        with rounds_bar(pipe, num_inference_steps) as on_round:
            latents, self.last_stats = parallel_denoise(
                pipe.unet, pipe.scheduler, latents, prompt_embeds, negative_prompt_embeds if do_cfg else None,
                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                num_inference_steps=num_inference_steps, generator=generator, eta=eta,
                cross_attention_kwargs=cross_attention_kwargs, on_round=on_round, **self.options)
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)  # as the sequential pipeline leaves it
        pipe._num_timesteps = len(pipe.scheduler.timesteps)
        # 8: decode, safety check, postprocess, as the pipeline does
        if output_type != "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image, has_nsfw_concept = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = ([True] * image.shape[0] if has_nsfw_concept is None
                          else [not has_nsfw for has_nsfw in has_nsfw_concept])
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw_concept
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
