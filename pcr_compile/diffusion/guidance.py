"""Classifier-free guidance inside the sampler step, as diffusers' Stable Diffusion pipelines run it.

`StableDiffusionPipeline.__call__` (diffusers 0.3x-0.4x, `pipelines/stable_diffusion/pipeline_stable_diffusion.py`)
denoises with

    latent_model_input = cat([latents] * 2)                     # then scheduler.scale_model_input
    noise_pred = unet(latent_model_input, t, encoder_hidden_states=cat([negative, positive])).sample
    uncond, text = noise_pred.chunk(2)
    noise_pred = uncond + guidance_scale * (text - uncond)
    noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale)   # only when guidance_rescale > 0
    latents = scheduler.step(noise_pred, t, latents).prev_sample

whenever `do_classifier_free_guidance` holds: `guidance_scale > 1` and the UNet has no guidance embedding
(`unet.config.time_cond_proj_dim is None`). `Guidance` is that decision, made once per loop; `guided` is the
step's denoiser part, the same ops in the same order (so an eager loop matches the pipeline's to float rounding,
and every step of a traced loop has the same ops). The step's input is scaled before it is doubled, which is
the same elementwise product. `rescale_noise_cfg` is Lin et al., "Common Diffusion Noise Schedules and Sample
Steps are Flawed" (arXiv 2305.08891), section 3.4; classifier-free guidance is Ho & Salimans, arXiv 2207.12598.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of every step: `scale` (> 1) and diffusers' `guidance_rescale` (>= 0)."""

    scale: float
    rescale: float = 0.0


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def make_guidance(guidance_scale: Any, guidance_rescale: Any, unet: Any = None) -> Guidance | None:
    """The `Guidance` of diffusers' `do_classifier_free_guidance`, or None (no guidance: one denoiser batch).

    None when `guidance_scale <= 1` or when `unet.config.time_cond_proj_dim` is set (a guidance-embedding UNet,
    e.g. LCM, which diffusers never runs with CFG); `guidance_rescale` is then ignored, as in diffusers.
    """
    scale = _real("guidance_scale", guidance_scale)
    rescale = _real("guidance_rescale", guidance_rescale)
    if rescale < 0.0:
        raise ValueError(f"guidance_rescale must be >= 0, got {guidance_rescale!r}")
    config = getattr(unet, "config", None)
    if scale <= 1.0 or getattr(config, "time_cond_proj_dim", None) is not None:
        return None
    return Guidance(scale, rescale)


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float
                      ) -> torch.Tensor:
    """diffusers' `rescale_noise_cfg`, op for op: the guided prediction's per-sample std matched to the text one's,
    mixed back by `guidance_rescale`."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def guided(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor,
           guidance: Guidance) -> torch.Tensor:
    """The guided model output for `x` (N, ...): one `denoise` call on `cat([x, x])` (2N rows, the unconditional
    half first, as the conditioning `cat([negative, positive])`), then the guidance combination.

    `t` is a 0-d timestep (the eager loop) or one per row, `(N,)` (the batched solve), doubled alike.
    """
    t2 = t if t.dim() == 0 else torch.cat([t] * 2)
    noise_pred = denoise(torch.cat([x] * 2), t2)  # (2N, ...)
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance.scale * (noise_pred_text - noise_pred_uncond)
    if guidance.rescale > 0.0:
        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance.rescale)
    return noise_pred


def check_conditioning(unet_kwargs: dict[str, Any], batch: int, guidance: Guidance | None) -> None:
    """Under guidance the UNet sees 2 x the latents' batch: `encoder_hidden_states` must be the negative and the
    positive embeddings concatenated, as the pipeline builds them."""
    ehs = unet_kwargs.get("encoder_hidden_states")
    if guidance is not None and isinstance(ehs, torch.Tensor) and ehs.dim() and ehs.shape[0] != 2 * batch:
        raise ValueError(f"with classifier-free guidance (guidance_scale={guidance.scale}) encoder_hidden_states "
                         f"must be cat([negative_prompt_embeds, prompt_embeds]), batch 2 * {batch} = {2 * batch} "
                         f"for latents of batch {batch}; got batch {ehs.shape[0]}")


def expand_conditioning(value: Any, batch: int, reps: int, guidance: Guidance | None) -> Any:
    """A UNet keyword argument for `reps` copies of the batch side by side (the batched solve's steps x candidates).

    A tensor with the latents' batch `B` as its leading dimension becomes `reps * B` rows; under guidance one with
    `2 B` rows (the negative half, then the positive) becomes `2 * reps * B`: each half repeated, so that it lines
    up with `cat([X, X])` of the `reps * B` batched samples `X`. Dicts (`added_cond_kwargs`) are expanded
    entry by entry; anything else passes unchanged.
    """
    if isinstance(value, dict):
        return {k: expand_conditioning(v, batch, reps, guidance) for k, v in value.items()}
    if not isinstance(value, torch.Tensor) or not value.dim():
        return value
    rest = value.shape[1:]
    if guidance is not None and value.shape[0] == 2 * batch:
        halves = value.reshape(2, batch, *rest)
        return halves.repeat(1, reps, *([1] * len(rest))).reshape(2 * reps * batch, *rest)
    if guidance is None and value.shape[0] == batch:
        return value.repeat(reps, *([1] * len(rest)))
    return value
