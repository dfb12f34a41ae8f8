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

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")

_STEP_KWARGS = {
    "DDIMScheduler": {"eta": 0.0, "use_clipped_model_output": False},
    "DDPMScheduler": {},
    "EulerDiscreteScheduler": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0},
    "DPMSolverMultistepScheduler": {},
}


@dataclass(frozen=True)
class StepCoefficients:
    """The constants of one sampler step; the update is written out in the module docstring.

    `timestep` is what the denoiser sees (as a 0-d tensor of `SamplerPlan.timestep_dtype`); `in_scale` is
    Euler's `scale_model_input`; `x_coef` / `m_coef` weight the current sample and the model output; `clip_coef`
    weighs `clamp(x * x0_x_coef + m * x0_m_coef)` (the clipped predicted original sample); `noise_coef` weighs
    this step's pre-drawn noise and `draws_noise` says whether diffusers draws noise at this step at all.
    """

    timestep: int | float
    in_scale: float = 1.0
    x_coef: float = 0.0
    m_coef: float = 0.0
    clip_coef: float = 0.0
    x0_x_coef: float = 0.0
    x0_m_coef: float = 0.0
    noise_coef: float = 0.0
    draws_noise: bool = False
    # multistep samplers: weights of the previous steps' stored predictions, and this step's prediction
    # `x * hist_x_coef + m * hist_m_coef` that the next steps read
    hist_coefs: tuple[float, ...] = ()
    hist_x_coef: float = 0.0
    hist_m_coef: float = 0.0


@dataclass(frozen=True)
class SamplerPlan:
    """Everything the loop needs from the scheduler, read once: the constants of each step, and which ops
    every step has.

    The op flags are decided once for all steps, so every step traces to the same op sequence: `scales_input`
    (Euler's input scaling), `clip_range` (clamp the predicted original sample; None: no clamp), and, derived
    from the steps, `stochastic` (some step draws noise), `uses_x` / `uses_m` (some step has a nonzero weight
    on the sample / the model output; a term that is zero at every step is left out).
    """

    scheduler: str
    steps: tuple[StepCoefficients, ...]
    timestep_dtype: torch.dtype
    init_noise_sigma: float
    scales_input: bool
    clip_range: float | None
    history: int = 0  # multistep samplers: how many previous model outputs a step reads
    stochastic: bool = field(init=False)
    uses_x: bool = field(init=False)
    uses_m: bool = field(init=False)

    def __post_init__(self):
        uses_m = any(s.m_coef != 0.0 for s in self.steps)
        uses_x = any(s.x_coef != 0.0 for s in self.steps) or not (uses_m or self.clip_range is not None)
        object.__setattr__(self, "stochastic", any(s.draws_noise for s in self.steps))
        object.__setattr__(self, "uses_x", uses_x)
        object.__setattr__(self, "uses_m", uses_m)


def sampling_loop(unet: Callable[..., Any], scheduler: Any, num_inference_steps: int, **kwargs: Any) -> SamplingLoop:
    """Return a `SamplingLoop` module running `scheduler`'s sampler over `unet` without graph breaks.

    Args:
        unet: a diffusers `UNet2DModel` / `UNet2DConditionModel`, or any callable `unet(x, t, **unet_kwargs)`
            returning a tensor or an object with `.sample` (or a tuple whose first element is the sample).
            `t` is a 0-d tensor (int64 for DDIM/DDPM, float32 for Euler), like an element of
            `scheduler.timesteps`.
        scheduler: a diffusers `DDIMScheduler`, `DDPMScheduler` or `EulerDiscreteScheduler`. It is not
            modified: a deep copy gets `set_timesteps(num_inference_steps)`.
        num_inference_steps: the number of sampler steps, a positive int.
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
    name = _scheduler_name(scheduler)
    allowed = _STEP_KWARGS[name]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"sampling_loop with {name} got unexpected keyword arguments {unknown}; "
                        f"it takes {sorted(allowed) or 'none'}")
    options = {**allowed, **kwargs}
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    plan = {"DDIMScheduler": _plan_ddim, "DDPMScheduler": _plan_ddpm, "EulerDiscreteScheduler": _plan_euler,
            "DPMSolverMultistepScheduler": _plan_multistep}[name](sched, **options)
    logger.debug("sampling_loop: %s, %d steps, clip=%s, stochastic=%s", name, len(plan.steps), plan.clip_range,
                 plan.stochastic)
    return SamplingLoop(unet, plan)


class SamplingLoop(nn.Module):
    """`forward(latents, generator=None, noise=None, **unet_kwargs)`: the sampler as one unrolled loop.

    `latents` must already be scaled by `init_noise_sigma` (1 for DDIM/DDPM). For stochastic samplers the
    per-step noise comes from `noise` (a `(steps, *latents.shape)` tensor, e.g. from `draw_noise`) when given,
    else it is drawn up front from `generator` (a `torch.Generator`, a list of them, one per sample, or None for
    the global RNG) exactly as diffusers' `step` would draw it. The draws run outside any compiled graph (they
    enter it as inputs), so compiled and eager loops draw the same noise. Deterministic samplers ignore
    `generator` and reject `noise`. Every other keyword goes to `unet` at every step (e.g.
    `encoder_hidden_states`).
    """

    def __init__(self, unet: Callable[..., Any], plan: SamplerPlan):
        super().__init__()
        self.unet = unet  # registered as a submodule when it is an nn.Module
        self.plan = plan

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
    generator on the CPU, as diffusers does); a list of generators draws one sample from each.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        shape = (1, *latents.shape[1:])
        return [torch.randn(shape, generator=g, device=g.device, dtype=latents.dtype) for g in generator]
    device = latents.device if generator is None else generator.device
    return [torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)]


def _join_parts(parts: list[torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    noise = parts[0] if len(parts) == 1 else torch.cat(parts)
    return noise if noise.device == latents.device else noise.to(latents.device)


def _scheduler_name(scheduler: Any) -> str:
    cls = type(scheduler)
    if cls.__name__ in SUPPORTED_SCHEDULERS and cls.__module__.startswith("diffusers."):
        return cls.__name__
    raise NotImplementedError(f"sampling_loop does not support {cls.__name__} ({cls.__module__}); "
                              f"supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}")


def _check_config(sched: Any, prediction_types: tuple[str, ...]) -> tuple[str, float | None]:
    """The prediction type and the clip range (None: no clipping); raise on what the loop cannot express."""
    cfg = sched.config
    name = type(sched).__name__
    if getattr(cfg, "thresholding", False):
        raise NotImplementedError(f"sampling_loop does not support {name} with thresholding=True "
                                  "(dynamic thresholding takes a per-sample quantile); use clip_sample instead")
    pred = cfg.prediction_type
    if pred not in prediction_types:
        raise NotImplementedError(f"sampling_loop does not support {name} with prediction_type={pred!r}; "
                                  f"supported: {', '.join(prediction_types)}")
    clip = float(cfg.clip_sample_range) if getattr(cfg, "clip_sample", False) else None
    return pred, clip


def _x0_eps_coefs(pred: str, a: float) -> tuple[float, float, float, float]:
    """(x0 = px x + pm m, eps = ex x + em m) for a model output m of type `pred`, alpha_cumprod `a`."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if pred == "epsilon":
        return 1.0 / sa, -sb / sa, 0.0, 1.0
    if pred == "v_prediction":
        return sa, -sb, sb, sa
    return 0.0, 1.0, 1.0 / sb, -sa / sb  # "sample"


def _int_timesteps(sched: Any) -> list[int]:
    return [int(t) for t in sched.timesteps.tolist()]


def _plan_ddim(sched: Any, eta: float, use_clipped_model_output: bool) -> SamplerPlan:
    pred, clip = _check_config(sched, ("epsilon", "v_prediction", "sample"))
    ac = sched.alphas_cumprod.double()
    final = float(sched.final_alpha_cumprod)
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    steps = []
    for t in _int_timesteps(sched):
        prev = t - stride
        a, a_prev = float(ac[t]), (float(ac[prev]) if prev >= 0 else final)
        variance = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)
        std = eta * math.sqrt(variance)
        d = math.sqrt(1.0 - a_prev - std**2)  # weight of the predicted epsilon
        px, pm, ex, em = _x0_eps_coefs(pred, a)
        if clip is None:  # x_prev = sqrt(a_prev) x0 + d eps (+ std noise), all linear in (x, m)
            c = StepCoefficients(t, x_coef=math.sqrt(a_prev) * px + d * ex, m_coef=math.sqrt(a_prev) * pm + d * em)
        elif use_clipped_model_output:  # eps re-derived from the clipped x0: (x - sqrt(a) x0c) / sqrt(1 - a)
            sb = math.sqrt(1.0 - a)
            c = StepCoefficients(t, x_coef=d / sb, clip_coef=math.sqrt(a_prev) - d * math.sqrt(a) / sb,
                                 x0_x_coef=px, x0_m_coef=pm)
        else:
            c = StepCoefficients(t, x_coef=d * ex, m_coef=d * em, clip_coef=math.sqrt(a_prev), x0_x_coef=px,
                                 x0_m_coef=pm)
        steps.append(_with_noise(c, std, eta > 0))
    return SamplerPlan("DDIMScheduler", tuple(steps), sched.timesteps.dtype, float(sched.init_noise_sigma), False, clip)


def _plan_ddpm(sched: Any) -> SamplerPlan:
    pred, clip = _check_config(sched, ("epsilon", "v_prediction", "sample"))
    vt = sched.config.variance_type
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise NotImplementedError(f"sampling_loop does not support DDPMScheduler with variance_type={vt!r}; "
                                  "supported: fixed_small, fixed_small_log, fixed_large")
    ac = sched.alphas_cumprod.double()
    ts = _int_timesteps(sched)
    steps = []
    for i, t in enumerate(ts):
        a = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0  # previous_timestep(): the next in the list
        alpha, beta = a / a_prev, 1.0 - a / a_prev
        x0_w = math.sqrt(a_prev) * beta / (1.0 - a)  # pred_original_sample_coeff
        x_w = math.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a)  # current_sample_coeff
        variance = max((1.0 - a_prev) / (1.0 - a) * beta, 1e-20)
        std = math.sqrt(beta) if vt == "fixed_large" else math.sqrt(variance)
        px, pm, _, _ = _x0_eps_coefs(pred, a)
        if clip is None:
            c = StepCoefficients(t, x_coef=x_w + x0_w * px, m_coef=x0_w * pm)
        else:
            c = StepCoefficients(t, x_coef=x_w, clip_coef=x0_w, x0_x_coef=px, x0_m_coef=pm)
        steps.append(_with_noise(c, std, t > 0))
    return SamplerPlan("DDPMScheduler", tuple(steps), sched.timesteps.dtype, float(sched.init_noise_sigma), False, clip)


def _plan_euler(sched: Any, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SamplerPlan:
    pred, _ = _check_config(sched, ("epsilon", "v_prediction", "sample", "original_sample"))
    sigmas = [float(s) for s in sched.sigmas.tolist()]
    steps = []
    for i, t in enumerate(sched.timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        dt = sigma_next - sigma_hat
        # x_hat = x + churn * noise;  x_prev = x_hat + dt * (x_hat - x0) / sigma_hat = a x_hat + b m
        if pred == "epsilon":
            a, b = 1.0, dt
        elif pred == "v_prediction":
            s2 = sigma**2 + 1.0
            a, b = 1.0 + dt * (1.0 - 1.0 / s2) / sigma_hat, dt * sigma / (math.sqrt(s2) * sigma_hat)
        else:  # x0 = m
            a, b = 1.0 + dt / sigma_hat, -dt / sigma_hat
        churn = s_noise * math.sqrt(max(sigma_hat**2 - sigma**2, 0.0))
        c = StepCoefficients(float(t), in_scale=1.0 / math.sqrt(sigma**2 + 1.0), x_coef=a, m_coef=b)
        steps.append(_with_noise(c, a * churn, gamma > 0))
    return SamplerPlan("EulerDiscreteScheduler", tuple(steps), sched.timesteps.dtype,
                       float(sched.init_noise_sigma), True, None)


def _plan_multistep(sched: Any) -> SamplerPlan:
    """A deterministic linear multistep sampler (DPM-Solver / DPM-Solver++), read off the scheduler itself.

    Its `step` converts the model output to a data prediction `d = p x + q m` (linear), keeps the last
    few, and returns a linear combination of the sample and those. Running the scheduler once on basis
    vectors -- the initial sample and each step's model output as independent symbols -- gives every
    sample and every stored prediction as a combination of those symbols, with diffusers' own order
    switching (warm-up, lower order at the end, final sigma). Each step is then solved for
    `x' = a x + c_0 d + sum_k c_k d_{-k}` over the fewest previous predictions that reproduce it
    (checked), which is what the loop traces.
    """
    name = type(sched).__name__
    cfg = sched.config
    _check_config(sched, ("epsilon", "v_prediction", "sample"))
    algorithm = getattr(cfg, "algorithm_type", "dpmsolver++")
    if algorithm not in ("dpmsolver++", "dpmsolver"):
        raise NotImplementedError(f"sampling_loop does not support {name} with algorithm_type={algorithm!r}; "
                                  "supported: dpmsolver++, dpmsolver (the SDE variants draw noise inside step)")
    if getattr(cfg, "variance_type", None) is not None:
        raise NotImplementedError(f"sampling_loop does not support {name} with variance_type={cfg.variance_type!r}")
    ts = sched.timesteps
    L = len(ts)
    probe = copy.deepcopy(sched)
    eye = torch.eye(1 + L, dtype=torch.float64)  # symbols: [initial sample, model output of step 0, 1, ...]
    X, D, PQ = [eye[0]], [], []
    for i, t in enumerate(ts):
        if probe.step_index is None:
            probe._init_step_index(t)
        d = probe.convert_model_output(eye[1 + i], sample=X[i]).to(torch.float64)
        q = float(d[1 + i])
        p = float(d[0] / X[i][0]) if float(X[i][0]) != 0.0 else 0.0
        if float((d - p * X[i] - q * eye[1 + i]).abs().max()) > 1e-6 * float(d.abs().max()):
            raise NotImplementedError(f"sampling_loop: {name}'s converted model output is not p x + q m")
        D.append(d)
        PQ.append((p, q))
        X.append(probe.step(eye[1 + i], t, X[i]).prev_sample.to(torch.float64))
        if not (torch.isfinite(d).all() and torch.isfinite(X[-1]).all()):
            raise ValueError(f"sampling_loop: {name}'s step gives non-finite values at step {i} (timestep "
                             f"{int(t)}) of {L} with this config; diffusers' own loop would too")
    for history in range(4):
        steps = []
        for i, t in enumerate(ts.tolist()):
            cols = [X[i]] + [D[i - k] if i - k >= 0 else torch.zeros_like(X[i]) for k in range(history + 1)]
            A = torch.stack(cols, dim=1)
            # Fit on the non-zero columns only (warm-up steps have no earlier prediction yet): LAPACK's
            # default gelsy returned garbage, at random, on the rank-deficient matrix.
            keep = A.abs().amax(0) > 0
            sol = torch.zeros(A.shape[1], dtype=A.dtype)
            sol[keep] = torch.linalg.lstsq(A[:, keep], X[i + 1].unsqueeze(1), driver="gelsd").solution.squeeze(1)
            if float((A @ sol - X[i + 1]).abs().max()) > 1e-6 * float(X[i + 1].abs().max()):
                break
            a, c = float(sol[0]), [float(v) for v in sol[1:]]
            p, q = PQ[i]
            steps.append(StepCoefficients(t, x_coef=a + c[0] * p, m_coef=c[0] * q, hist_coefs=tuple(c[1:]),
                                          hist_x_coef=p, hist_m_coef=q))
        else:
            return SamplerPlan(name, tuple(steps), ts.dtype, float(sched.init_noise_sigma), False, None,
                               history=history)
    raise NotImplementedError(f"sampling_loop: {name} with this config reads more than 3 previous predictions")


def _with_noise(c: StepCoefficients, coef: float, draws: bool) -> StepCoefficients:
    return StepCoefficients(c.timestep, c.in_scale, c.x_coef, c.m_coef, c.clip_coef, c.x0_x_coef, c.x0_m_coef,
                            coef if draws else 0.0, draws, c.hist_coefs, c.hist_x_coef, c.hist_m_coef)
