"""`sampling_loop`: a diffusers scheduler's sampler as one graph-break-free loop module (`SamplingLoop`).

See the package docstring (``pcr_compile.diffusion``) for the loop's ops and the noise draws.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from pcr_compile.diffusion.guidance import Guidance, check_conditioning, guided, make_guidance
from pcr_compile.diffusion.plans import (
    SCHEDULERS,
    SamplerPlan,
    _scheduler_name,
)

log = logging.getLogger(__name__)


def sampling_loop(unet: Callable[..., Any], scheduler: Any, num_inference_steps: int, *,
                  guidance_scale: float = 1.0, guidance_rescale: float = 0.0, **kwargs: Any) -> SamplingLoop:
    """Return a `SamplingLoop` module running `scheduler`'s sampler over `unet` without graph breaks.

    Args:
        unet: a diffusers `UNet2DModel` / `UNet2DConditionModel`, or any callable `unet(x, t, **unet_kwargs)`
            returning a tensor or an object with `.sample` (or a tuple whose first element is the sample).
            `t` is a 0-d tensor (int64 for DDIM/DDPM, float32 for Euler), like an element of
            `scheduler.timesteps`.
        scheduler: a diffusers `DDIMScheduler`, `DDPMScheduler` or `EulerDiscreteScheduler`. It is not
            modified: a deep copy gets `set_timesteps(num_inference_steps)`.
        num_inference_steps: the number of sampler steps, a positive int.
        guidance_scale: classifier-free guidance as Stable Diffusion pipelines run it
            (``pcr_compile/diffusion/guidance.py``): above 1 each step calls `unet` once on `cat([x, x])` and
            returns `uncond + guidance_scale * (text - uncond)` of the two halves, so `encoder_hidden_states` must
            be `cat([negative_prompt_embeds, prompt_embeds])` (2 x the latents' batch). At most 1 (the default),
            or a UNet with `config.time_cond_proj_dim` set: no guidance, as diffusers' `do_classifier_free_guidance`.
        guidance_rescale: diffusers' `guidance_rescale` (`rescale_noise_cfg`), applied when > 0 under guidance.
        **kwargs: the extra arguments of the scheduler's `step`, fixed for the whole loop: `eta` and
            `use_clipped_model_output` (DDIM); `s_churn`, `s_tmin`, `s_tmax`, `s_noise` (Euler).

    Returns:
        A `SamplingLoop` (an `nn.Module`; `unet` is a submodule when it is one). `loop(latents, **unet_kwargs)`
        expects `latents` already multiplied by `loop.init_noise_sigma`, as diffusers' pipelines do in
        `prepare_latents`, and returns the final sample.

    Raises:
        ValueError: `num_inference_steps` is not a positive int, or the scheduler gives non-finite values with it.
        NotImplementedError: an unsupported scheduler class or config option (thresholding, learned variance).
        TypeError: a keyword argument this scheduler's `step` does not take.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    guidance = make_guidance(guidance_scale, guidance_rescale, unet)
    name = _scheduler_name(scheduler)
    allowed = SCHEDULERS[name].step_kwargs
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"sampling_loop with {name} got unexpected keyword arguments {unknown}; "
                        f"it takes {sorted(allowed) or 'none'}")
    options = {**allowed, **{k: _step_option(k, v, allowed[k]) for k, v in kwargs.items()}}
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    plan = SCHEDULERS[name].plan(sched, **options)
    log.debug("sampling_loop: %s, %d steps, clip=%s, stochastic=%s, guidance=%s", name, len(plan.steps),
              plan.clip_range, plan.stochastic, guidance)
    return SamplingLoop(unet, plan, guidance)


def _step_option(key: str, value: Any, default: Any) -> Any:
    """A scheduler `step` keyword as the plan reads it: a bool (or None) where diffusers' default is one, else a
    real number (a one-element tensor is read as one); NaN, and an infinite eta / s_churn / s_noise, are errors
    (diffusers' step would give NaN samples or fail on them)."""
    if isinstance(default, bool):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"sampling_loop: {key} must be a bool or None, got {value!r}")
        return bool(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"sampling_loop: {key} must be a real number, got {value!r}")
    if math.isnan(value) or (key not in ("s_tmin", "s_tmax") and math.isinf(value)):
        raise ValueError(f"sampling_loop: {key} must be {'a number' if key in ('s_tmin', 's_tmax') else 'finite'}, "
                         f"got {value!r}")
    return float(value)


class SamplingLoop(nn.Module):
    """`forward(latents, generator=None, noise=None, **unet_kwargs)`: the sampler as one unrolled loop.

    `latents` must already be scaled by `init_noise_sigma` (1 for DDIM/DDPM). For stochastic samplers the
    per-step noise comes from `noise` (a `(steps, *latents.shape)` tensor, e.g. from `draw_noise`) when given,
    else it is drawn up front from `generator` (a `torch.Generator`, a list of them, one per sample, or None for
    the global RNG) exactly as diffusers' `step` would draw it. The draws run outside any compiled graph (they
    enter it as inputs), so compiled and eager loops draw the same noise. Deterministic samplers ignore
    `generator` and reject `noise`. Every other keyword goes to `unet` at every step (e.g.
    `encoder_hidden_states`). With `guidance` (classifier-free guidance, `sampling_loop(guidance_scale=...)`)
    the unet sees the doubled batch `cat([x, x])` and its keywords are the pipeline's doubled conditioning.
    """

    def __init__(self, unet: Callable[..., Any], plan: SamplerPlan, guidance: Guidance | None = None):
        super().__init__()
        self.unet = unet  # registered as a submodule when it is an nn.Module
        self.plan = plan
        self.guidance = guidance

    @property
    def init_noise_sigma(self) -> float:
        return self.plan.init_noise_sigma

    @property
    def timesteps(self) -> list[int | float]:
        return [s.timestep for s in self.plan.steps]

    def draw_noise(self, latents: torch.Tensor, generator: Any = None) -> torch.Tensor:
        """All the noise diffusers' `step` would draw, in its order: `(steps, *latents.shape)`, zeros where none."""
        return self._stack_noise(_draw_raw(latents, generator, sum(s.draws_noise for s in self.plan.steps)), latents)

    def _stack_noise(self, raw: list[list[torch.Tensor]], latents: torch.Tensor) -> torch.Tensor:
        draws = iter(raw)
        return torch.stack([_join_parts(next(draws), latents) if s.draws_noise else torch.zeros_like(latents)
                            for s in self.plan.steps])

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any]) -> torch.Tensor:
        """The model output the scheduler's step takes for `x` (N, ...): guided when the loop has guidance."""
        if self.guidance is None:
            return self._unet_output(x, t, unet_kwargs)
        return guided(lambda xx, tt: self._unet_output(xx, tt, unet_kwargs), x, t, self.guidance)

    def _unet_output(self, x: torch.Tensor, t: torch.Tensor, unet_kwargs: dict[str, Any]) -> torch.Tensor:
        out = self.unet(x, t, **unet_kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "sample"):
            return out.sample
        if isinstance(out, (tuple, list)):
            return out[0]
        raise TypeError(f"unet returned {type(out).__name__}; expected a tensor, an object with .sample or a tuple")

    def forward(self, latents: torch.Tensor, generator: Any = None, noise: torch.Tensor | None = None,
                **unet_kwargs: Any) -> torch.Tensor:
        plan = self.plan
        if plan.stochastic:
            if noise is None:  # not self.draw_noise: the eager draw must sit in this frame, before any graph op
                raw = _draw_raw(latents, generator, sum(s.draws_noise for s in plan.steps))
                noise = self._stack_noise(raw, latents)  # (steps, *latents.shape)
            elif tuple(noise.shape) != (len(plan.steps), *latents.shape):
                raise ValueError(f"noise must have shape {(len(plan.steps), *latents.shape)}, "
                                 f"got {tuple(noise.shape)}")
        elif noise is not None:
            raise ValueError(f"{plan.scheduler} with these settings is deterministic; it takes no noise")
        check_conditioning(unet_kwargs, latents.shape[0], self.guidance)
        x = latents
        # Multistep samplers carry the last `history` model outputs (zeros before the first step).
        hist = [torch.zeros_like(latents) for _ in range(plan.history)]
        for i, s in enumerate(plan.steps):
            t = torch.full((), s.timestep, dtype=plan.timestep_dtype, device=x.device)
            m = self._denoise(x * s.in_scale if plan.scales_input else x, t, unet_kwargs)
            terms = []  # which terms exist is decided once for all steps, so every step has the same ops
            if plan.uses_x:
                terms.append(x * s.x_coef)
            if plan.uses_m:
                terms.append(m * s.m_coef)
            if plan.clip_range is not None:
                x0 = (x * s.x0_x_coef + m * s.x0_m_coef).clamp(-plan.clip_range, plan.clip_range)
                terms.append(x0 * s.clip_coef)
            if plan.stochastic:
                terms.append(noise[i] * s.noise_coef)
            terms += [h * c for h, c in zip(hist, s.hist_coefs)]
            if plan.history:  # this step's prediction; older ones are copied (a step makes what it carries)
                hist = [x * s.hist_x_coef + m * s.hist_m_coef] + [h.clone() for h in hist[:-1]]
            x = terms[0]
            for term in terms[1:]:
                x = x + term
        return x


@torch.compiler.disable
def _draw_raw(latents: torch.Tensor, generator: Any, count: int) -> list[list[torch.Tensor]]:
    """`count` successive `_randn_parts` draws, always run eagerly.

    Under Dynamo a draw from a `torch.Generator` is a graph break, and one inside a loop makes Dynamo skip the
    whole frame; run outside the trace, the draws happen before the graph (nothing precedes them in `forward`),
    so they cost no break and enter the graph as inputs, reproducible for the generator or the global RNG alike.
    """
    return [_randn_parts(latents, generator) for _ in range(count)]


def _randn_parts(latents: torch.Tensor, generator: Any) -> list[torch.Tensor]:
    """The draws of `diffusers.utils.torch_utils.randn_tensor(latents.shape, generator, latents.device, dtype)`.

    Re-implemented (same draws, same order) so that all draws come first and the device moves and
    concatenations after them (`_join_parts`), inside the graph. A generator draws on its own device (a CPU
    generator on the CPU, as diffusers does); a list of generators draws one sample from each of its first
    `batch` (a longer list's others are unused, as in diffusers; a shorter one is an error).
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):  # one sample from each of the first `batch` (randn_tensor's rule)
        batch = latents.shape[0]
        if len(generator) < batch:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch} samples")
        shape = (1, *latents.shape[1:])
        return [torch.randn(shape, generator=g, device=g.device, dtype=latents.dtype) for g in generator[:batch]]
    device = latents.device if generator is None else generator.device
    return [torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)]


def _join_parts(parts: list[torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    noise = parts[0] if len(parts) == 1 else torch.cat(parts)
    return noise if noise.device == latents.device else noise.to(latents.device)
