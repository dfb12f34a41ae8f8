"""diffusers pipelines, sampled by the parallel solve: `parallel_pipeline(DDIMPipeline | DDPMPipeline)`, and
the Stable Diffusion denoising loop with classifier-free guidance: `parallel_denoise`.

`parallel_pipeline(pipe)(batch_size=..., num_inference_steps=..., generator=...)` takes the arguments of the
wrapped pipeline's `__call__` and returns what it returns (an `ImagePipelineOutput`, or a tuple with
`return_dict=False`), from the same initial latents and the same per-step noise (drawn from `generator` in
diffusers' order), so the images equal the sequential pipeline's within the solve's tolerance. The sampler
runs through `sampling_loop` + `parallel_sample`; the progress bar (the pipeline's own `progress_bar`, so
`pipe.set_progress_bar_config` applies) advances once per round, its total the number of steps (the most
rounds a solve takes). The stats of the last call are in `.last_stats`. The arguments are bound by the wrapped
pipeline's own signature (DDPM's third positional argument is `num_inference_steps`, and it takes no `eta`), and
the loop is the pipelines' own: no `scale_model_input` and no `init_noise_sigma`, whatever scheduler is swapped
in. What `sampling_loop` declines (thresholding, ancestral Euler, PNDM, ...) runs the wrapped pipeline itself,
sequentially and exactly, with a warning (`last_stats.fell_back`, `last_stats.reason`); a scheduler whose `step`
cannot take the keywords the pipeline's loop passes it (DDIM's `eta=`, DDPM's `generator=`: diffusers' own pipeline
fails on its first step) raises a TypeError naming the pipeline and the scheduler; a call that raises leaves
`last_stats` None. The call ends, as the pipelines' own do, with `maybe_free_model_hooks()`. Attributes read or set
on the wrapper are the pipeline's (`par.scheduler = ...` swaps the pipeline's scheduler), but for `last_stats`.

`parallel_denoise(unet, scheduler, latents, prompt_embeds, negative_prompt_embeds, guidance_scale=7.5, ...)` is
step 7 of `StableDiffusionPipeline.__call__` (the denoising loop over a `UNet2DConditionModel`, with guidance and
`guidance_rescale`; ``pcr_compile/diffusion/guidance.py``), from the latents that `prepare_latents` makes, to the
latents the pipeline returns with `output_type="latent"`. It takes prompt embeddings, not prompts.

`parallel_pipeline(StableDiffusionPipeline)` wraps the whole text-to-image pipeline (prompts, decoding, safety
checker): ``pcr_compile/diffusion/sd_pipeline.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pcr_compile.diffusion.guidance import Guidance, guided, make_guidance
from pcr_compile.diffusion.loop import SamplingLoop, sampling_loop
from pcr_compile.diffusion.parallel import parallel_sample
from pcr_compile.solver.sampler import SamplerStats

log = logging.getLogger(__name__)

PIPELINES = ("DDIMPipeline", "DDPMPipeline")
SD_PIPELINE = "StableDiffusionPipeline"  # sd_pipeline.py
# the keyword arguments of parallel_sample that configure the solve (everything else would reach the unet)
SOLVER_OPTIONS = ("tol", "rule", "accel", "history", "window", "max_iters", "jacobian")


@contextlib.contextmanager
def rounds_bar(pipe: Any, steps: int) -> Iterator[Callable[[int, int], None]]:
    """The pipeline's own progress bar (so `pipe.set_progress_bar_config` applies), ticking once per round of
    the solve, its total the step count (the most rounds a solve takes); yields the solve's `on_round`."""
    bar = pipe.progress_bar(total=steps)
    bar.set_description("rounds")

    def on_round(committed: int, steps: int) -> None:
        bar.update(1)
        bar.set_postfix(steps=f"{committed}/{steps}")

    try:
        yield on_round
    finally:
        bar.close()


def _check_solver_options(options: dict[str, Any], who: str) -> None:
    unknown = sorted(set(options) - set(SOLVER_OPTIONS))
    if unknown:
        raise TypeError(f"{who} got unexpected solver options {unknown}; it takes {list(SOLVER_OPTIONS)}")


class PipelineWrapper:
    """A wrapped diffusers pipeline: every attribute but the wrapper's own (`pipe`, `options`, `last_stats`) is
    the pipeline's, read and set (`wrapper.scheduler = X.from_config(...)` swaps the scheduler the call runs;
    set on the wrapper, it was read back but never run)."""

    _OWN = ("pipe", "options", "last_stats")

    def __getattr__(self, item: str) -> Any:  # unet, scheduler, progress_bar, ... of the wrapped pipeline
        return getattr(self.__dict__["pipe"], item)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__["pipe"], name, value)


class ParallelPipeline(PipelineWrapper):
    """A DDIM / DDPM pipeline whose sampler loop is one parallel solve; see the module docstring."""

    def __init__(self, pipe: Any, **solver_options: Any):
        name = type(pipe).__name__
        if name not in PIPELINES or not type(pipe).__module__.startswith("diffusers."):
            hint = ("; for another Stable Diffusion pipeline run its denoising loop with pcr_compile.diffusion."
                    "parallel_denoise(pipe.unet, pipe.scheduler, latents, prompt_embeds, negative_prompt_embeds)"
                    if "StableDiffusion" in name else "")
            raise NotImplementedError(f"parallel_pipeline supports {', '.join((*PIPELINES, SD_PIPELINE))}, got "
                                      f"{name}{hint}")
        _check_solver_options(solver_options, "parallel_pipeline")
        self.pipe, self.options, self.last_stats = pipe, dict(solver_options), None

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        cfg = self.pipe.unet.config
        size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        return (batch_size, cfg.in_channels, *size)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any):
        """The wrapped pipeline's call, its arguments bound by that pipeline's own `__call__` signature.

        `DDIMPipeline`: (batch_size, generator, eta, num_inference_steps, use_clipped_model_output, output_type,
        return_dict); `DDPMPipeline`: (batch_size, generator, num_inference_steps, output_type, return_dict). So
        positional arguments, defaults and unexpected keywords mean here what they mean there. A scheduler or
        config `sampling_loop` does not support (thresholding, ancestral Euler, PNDM, ...) runs the wrapped
        pipeline itself, sequentially, with a warning; `last_stats.fell_back` and `.reason` say so.
        """
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        name = type(pipe).__name__
        self.last_stats = None  # a call that raises leaves no stats of an earlier call behind
        try:
            bound = inspect.signature(type(pipe).__call__).bind(pipe, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}.__call__ (parallel_pipeline): {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        batch_size, generator, num_inference_steps = a["batch_size"], a["generator"], a["num_inference_steps"]
        if isinstance(num_inference_steps, float) and num_inference_steps.is_integer() and num_inference_steps > 0:
            num_inference_steps = int(num_inference_steps)  # 50.0 from a config file: DDPMPipeline takes it
        output_type, return_dict = a["output_type"], a["return_dict"]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got a list of {len(generator)} generators for batch_size={batch_size}")
        _check_step_takes(pipe)
        # the scheduler keywords the pipeline's loop passes to step (DDIM: eta always, use_clipped_model_output
        # when not None; DDPM: none)
        step_kwargs = {k: a[k] for k in ("eta", "use_clipped_model_output") if a.get(k) is not None}
        try:
            loop = sampling_loop(pipe.unet, pipe.scheduler, num_inference_steps, **step_kwargs)
        except NotImplementedError as e:  # the pipeline's own loop is exact: run it rather than fail
            log.warning("parallel_pipeline: %s; running %s's own sequential loop", e, name)
            out = pipe(*args, **kwargs)
            steps = len(pipe.scheduler.timesteps)
            self.last_stats = SamplerStats(fell_back=True, reason=f"sequential pipeline: {e}", sequential_steps=steps,
                                           step_evaluations=steps)
            return out
        # These pipelines' loops call neither scale_model_input nor multiply the initial noise by init_noise_sigma,
        # whatever the scheduler (Euler's are not one): the loop does as they do.
        loop = SamplingLoop(loop.unet, dataclasses.replace(loop.plan, scales_input=False, init_noise_sigma=1.0),
                            loop.guidance)
        device = pipe._execution_device
        # the pipelines' own initial draw: DDIM on the execution device, DDPM too (off mps)
        image = randn_tensor(self._image_shape(batch_size), generator=generator, device=device,
                             dtype=pipe.unet.dtype)
        with rounds_bar(pipe, num_inference_steps) as on_round:
            image, self.last_stats = parallel_sample(loop, image, generator=generator, on_round=on_round,
                                                     **self.options)
        pipe.scheduler.set_timesteps(num_inference_steps)  # left as the sequential pipeline leaves it
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()  # as the pipelines' own __call__ ends (enable_model_cpu_offload's hooks)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


# the keywords DDIMPipeline's / DDPMPipeline's loop passes to `scheduler.step` at every step
_STEP_KEYWORDS = {"DDIMPipeline": ("eta", "use_clipped_model_output", "generator"), "DDPMPipeline": ("generator",)}


def _check_step_takes(pipe: Any) -> None:
    """Raise a TypeError naming the pipeline and the scheduler when the scheduler's `step` cannot take what the
    pipeline's loop passes it (diffusers' own pipeline fails on its first step then, with
    "step() got an unexpected keyword argument"): a scheduler swapped in after construction."""
    name, sched = type(pipe).__name__, pipe.scheduler
    try:
        params = inspect.signature(sched.step).parameters
    except (TypeError, ValueError, AttributeError):
        return  # no step to read: left to the pipeline's own loop
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in _STEP_KEYWORDS[name] if k not in params]
    if not missing:
        return
    cls = type(sched).__name__
    if name == "DDIMPipeline":
        hint = ("DDIMPipeline runs DDIMScheduler (its constructor converts any scheduler to one): set "
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config), or wrap "
                f"DDPMPipeline(unet=pipe.unet, scheduler=...) to sample with {cls}")
    else:
        hint = ("DDPMPipeline runs schedulers whose step takes a generator; DDPMScheduler, DDIMScheduler, "
                "EulerDiscreteScheduler and DPMSolverMultistepScheduler are among them and are solved in parallel")
    raise TypeError(f"parallel_pipeline: {name}'s loop passes {', '.join(k + '=' for k in missing)} to "
                    f"scheduler.step, which {cls}.step does not take (diffusers' own {name} raises TypeError on its "
                    f"first step with this scheduler too); {hint}")


def parallel_pipeline(pipe: Any, **solver_options: Any) -> Any:
    """Wrap a diffusers `DDIMPipeline` / `DDPMPipeline` (a `ParallelPipeline`) or `StableDiffusionPipeline` (a
    `ParallelStableDiffusionPipeline`); `solver_options` go to `parallel_sample` (tol, rule, accel, jacobian,
    history, window, max_iters)."""
    if type(pipe).__name__ == SD_PIPELINE and type(pipe).__module__.startswith("diffusers."):
        from pcr_compile.diffusion.sd_pipeline import ParallelStableDiffusionPipeline

        return ParallelStableDiffusionPipeline(pipe, **solver_options)
    return ParallelPipeline(pipe, **solver_options)


@torch.no_grad()
def parallel_denoise(unet: Any, scheduler: Any, latents: torch.Tensor | None, prompt_embeds: torch.Tensor,
                     negative_prompt_embeds: torch.Tensor | None = None, *, guidance_scale: float = 7.5,
                     guidance_rescale: float = 0.0, num_inference_steps: int = 50, generator: Any = None,
                     eta: float = 0.0, cross_attention_kwargs: dict[str, Any] | None = None,
                     added_cond_kwargs: dict[str, Any] | None = None, on_round=None, **solver_options: Any
                     ) -> tuple[torch.Tensor, SamplerStats]:
    """`StableDiffusionPipeline.__call__`'s denoising loop (classifier-free guidance included) by the parallel solve.

    Equal, within the solve's tolerance, to `pipe(prompt_embeds=prompt_embeds,
    negative_prompt_embeds=negative_prompt_embeds, latents=latents, guidance_scale=..., guidance_rescale=...,
    num_inference_steps=..., eta=..., generator=..., output_type="latent").images` of a pipeline with this
    `unet` and `scheduler` (one image per prompt; default height and width when `latents` is None).

    Args:
        unet: a diffusers `UNet2DConditionModel` (or a callable `unet(x, t, encoder_hidden_states=...)`, as for
            `sampling_loop`). A UNet with `config.time_cond_proj_dim` (a guidance embedding, LCM) is not supported.
        scheduler: a diffusers scheduler; not modified. One `sampling_loop` supports (DDIM, DDPM, Euler, DPM-Solver
            multistep) is solved in parallel; any other (or a config it declines, e.g. thresholding) runs the
            pipeline's loop sequentially with its own `step`, with a warning (`stats.fell_back`, `stats.reason`;
            `stats.sequential_steps` is then the scheduler's number of timesteps, e.g. PNDM's warm-up included).
        latents: the initial noise `(B, C, H, W)` as the pipeline's `latents=` takes it (before the scheduler's
            `init_noise_sigma`, applied here), or None: drawn as `prepare_latents` does, `randn_tensor((B,
            in_channels, sample_size, sample_size), generator)` in `prompt_embeds`' dtype on its device.
        prompt_embeds: the text embeddings `(B, seq, dim)`, as `pipe.encode_prompt` returns them.
        negative_prompt_embeds: the unconditional embeddings, the same shape; required when guidance is on
            (diffusers encodes the empty prompt there, which needs the text encoder).
        guidance_scale, guidance_rescale: as in the pipeline; guidance is on when `guidance_scale > 1`.
        num_inference_steps: the number of sampler steps.
        generator: a `torch.Generator` or a list of B, for the initial latents and any per-step noise.
        eta: DDIM's eta (passed only to schedulers whose `step` takes it, as `prepare_extra_step_kwargs`).
        cross_attention_kwargs, added_cond_kwargs: passed to the unet at every step, as the pipeline does.
        on_round: `on_round(committed_steps, steps)` after each round.
        **solver_options: `parallel_sample`'s options: tol, rule, accel, history, window, max_iters, jacobian.

    Returns:
        `(latents, stats)`: the denoised latents (decode them with `pipe.vae`) and the solve's `SamplerStats`.

    Raises:
        TypeError: `prompt_embeds` / `negative_prompt_embeds` / `latents` is not a tensor, or an unknown solver option.
        ValueError: shapes or dtypes that do not match (naming the argument; a diffusers unet's in_channels,
            cross_attention_dim and dtype are checked), or guidance without `negative_prompt_embeds`.
        NotImplementedError: a guidance-embedding UNet, or a scheduler from outside diffusers that `sampling_loop`
            does not support.
    """
    _check_solver_options(solver_options, "parallel_denoise")
    if not isinstance(prompt_embeds, torch.Tensor):
        raise TypeError(f"prompt_embeds must be a tensor (batch, seq, dim), got {type(prompt_embeds).__name__}")
    if prompt_embeds.dim() != 3:
        raise ValueError(f"prompt_embeds must be (batch, seq, dim), got shape {tuple(prompt_embeds.shape)}")
    config = getattr(unet, "config", None)
    if getattr(config, "time_cond_proj_dim", None) is not None:
        raise NotImplementedError("parallel_denoise does not support a UNet with time_cond_proj_dim (a guidance "
                                  "embedding, as LCM): pass its timestep_cond to sampling_loop's loop instead")
    cross_dim = getattr(config, "cross_attention_dim", None)
    if isinstance(cross_dim, int) and prompt_embeds.shape[-1] != cross_dim:
        raise ValueError(f"prompt_embeds must be (batch, seq, {cross_dim}) for this unet (config.cross_attention_dim="
                         f"{cross_dim}), got shape {tuple(prompt_embeds.shape)}")
    unet_dtype = getattr(unet, "dtype", None)
    if isinstance(unet_dtype, torch.dtype) and unet_dtype.is_floating_point and prompt_embeds.dtype != unet_dtype:
        raise ValueError(f"prompt_embeds are {prompt_embeds.dtype} but the unet is {unet_dtype} (latents=None are "
                         "drawn in prompt_embeds' dtype, as the pipeline does); pass embeddings of the unet's dtype")
    guidance = make_guidance(guidance_scale, guidance_rescale, unet)
    # prepare_extra_step_kwargs: eta only for a scheduler whose step takes it (DDIM)
    step = getattr(scheduler, "step", None)
    step_kwargs = {"eta": eta} if callable(step) and "eta" in inspect.signature(step).parameters else {}
    try:
        loop = sampling_loop(unet, scheduler, num_inference_steps, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, **step_kwargs)
        declined = None
    except NotImplementedError as e:  # a diffusers scheduler: its own loop, run sequentially below, is exact
        if not type(scheduler).__module__.startswith("diffusers."):
            raise
        loop, declined = None, e
    B = prompt_embeds.shape[0]
    if guidance is not None:
        if negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_prompt_embeds (the pipeline "
                             "encodes the negative or empty prompt with its text encoder; pass the embeddings)")
        if not isinstance(negative_prompt_embeds, torch.Tensor):
            raise TypeError("negative_prompt_embeds must be a tensor, got "
                            f"{type(negative_prompt_embeds).__name__}")
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds must have prompt_embeds' shape {tuple(prompt_embeds.shape)}, "
                             f"got {tuple(negative_prompt_embeds.shape)}")
        negative = negative_prompt_embeds.to(dtype=prompt_embeds.dtype, device=prompt_embeds.device)
        encoder_hidden_states = torch.cat([negative, prompt_embeds])  # (2B, seq, dim): unconditional half first
    else:
        encoder_hidden_states = prompt_embeds
    if isinstance(generator, list) and len(generator) != B:
        raise ValueError(f"got a list of {len(generator)} generators for a batch of {B} prompt embeddings")
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        if config is None or not hasattr(config, "sample_size") or not hasattr(config, "in_channels"):
            raise ValueError("latents=None draws them from unet.config (in_channels, sample_size); this unet has "
                             "no such config: pass latents")
        size = config.sample_size
        size = (size,) * 2 if isinstance(size, int) else tuple(size)
        latents = randn_tensor((B, config.in_channels, *size), generator=generator, device=prompt_embeds.device,
                               dtype=prompt_embeds.dtype)
    elif not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor or None, got {type(latents).__name__}")
    elif latents.shape[0] != B:
        raise ValueError(f"latents has batch {latents.shape[0]} but prompt_embeds has batch {B}")
    unet_kwargs: dict[str, Any] = {"encoder_hidden_states": encoder_hidden_states}
    if cross_attention_kwargs is not None:
        unet_kwargs["cross_attention_kwargs"] = cross_attention_kwargs
    if added_cond_kwargs is not None:
        unet_kwargs["added_cond_kwargs"] = added_cond_kwargs
    if declined is not None:
        log.warning("parallel_denoise: %s; running the pipeline's denoising loop sequentially", declined)
        return _sequential_denoise(unet, scheduler, latents, num_inference_steps, guidance, generator, step_kwargs,
                                   unet_kwargs, on_round, f"sequential loop: {declined}")
    return parallel_sample(loop, latents * loop.init_noise_sigma, generator=generator, on_round=on_round,
                           **solver_options, **unet_kwargs)


def _sequential_denoise(unet: Any, scheduler: Any, latents: torch.Tensor, steps: int, guidance: Guidance | None,
                        generator: Any, step_kwargs: dict[str, Any], unet_kwargs: dict[str, Any], on_round,
                        reason: str) -> tuple[torch.Tensor, SamplerStats]:
    """`StableDiffusionPipeline.__call__`'s denoising loop as it is, with the real `scheduler.step` (on a copy: the
    scheduler passed in is not modified), for schedulers `sampling_loop` declines."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=latents.device)
    latents = latents * sched.init_noise_sigma
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs = {**step_kwargs, "generator": generator}
    timesteps = sched.timesteps

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(x, t, **unet_kwargs)
        return out if isinstance(out, torch.Tensor) else out.sample if hasattr(out, "sample") else out[0]

    for i, t in enumerate(timesteps):
        x = sched.scale_model_input(latents, t)  # elementwise: the same as scaling cat([latents] * 2)
        noise_pred = denoise(x, t) if guidance is None else guided(denoise, x, t, guidance)
        latents = sched.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        if on_round:
            on_round(i + 1, len(timesteps))
    return latents, SamplerStats(fell_back=True, reason=reason, sequential_steps=len(timesteps),
                                 step_evaluations=len(timesteps))
