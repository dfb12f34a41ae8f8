"""What a diffusers scheduler's sampler does, read once into per-step constants (`SamplerPlan`).

The update every step runs, and the supported schedulers and options, are described in the package docstring
(``pcr_compile.diffusion``). `sigma` of each step is the noise level its output still carries, the scale of
the `rule="sigma"` stopping rule (``pcr_compile/solver/residual.py`` `sigma_residuals`; ParaDiGMS): the ancestral
(posterior) standard deviation between the step's noise level and the next, `s' sqrt(1 - s'^2 / s^2)` for
variance-exploding sigmas `s -> s'`, times `sqrt(alpha_cumprod')` for the variance-preserving samplers
(DDIM, DDPM, DPM-Solver: the DDPM posterior standard deviation), and zero at a last step to a clean sample.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)



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
    # the noise level the step's output still carries (module docstring): the scale of rule="sigma"
    sigma: float = 0.0
    # d x' / d x with the predicted clean sample (and any stored predictions) held fixed: the scalar Jacobian
    # the sampler solve's jacobian="scalar" starts from (for DDIM sqrt(1 - a') / sqrt(1 - a), the ratio of
    # the noise levels); its measured secants replace it from the second round on
    x0_gain: float = 1.0


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
    if pred == "epsilon" and sa == 0.0:
        raise NotImplementedError(
            "sampling_loop does not support prediction_type='epsilon' at a step with alphas_cumprod = 0 (zero "
            "terminal SNR: rescale_betas_zero_snr=True with trailing timesteps): the predicted clean sample divides "
            "by zero (diffusers' step gives +-inf there, before any clipping); use prediction_type='v_prediction'")
    if pred == "epsilon":
        return 1.0 / sa, -sb / sa, 0.0, 1.0
    if pred == "v_prediction":
        return sa, -sb, sb, sa
    return 0.0, 1.0, 1.0 / sb, -sa / sb  # "sample"


def _x0_gain(x_coef: float, m_coef: float, px: float, pm: float) -> float:
    """d x' / d x of `x' = x_coef x + m_coef m (+ terms of x0 only)` along the model outputs that keep the
    predicted clean sample `x0 = px x + pm m` fixed (dm / dx = -px / pm; pm == 0: m does not enter x0)."""
    return x_coef - m_coef * px / pm if pm != 0.0 else x_coef


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
        rest = 1.0 - a_prev - std**2
        if rest < -1e-12:  # eta > 1 can take more variance than the step has
            raise ValueError(f"sampling_loop: DDIMScheduler with eta={eta} gives 1 - alpha_prev - std^2 = {rest:.3g} "
                             f"< 0 at timestep {t} (std = eta * sqrt(variance)); diffusers' step gives NaN there. "
                             "Use eta in [0, 1]")
        d = math.sqrt(max(rest, 0.0))  # weight of the predicted epsilon
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
        c = dataclasses.replace(c, sigma=math.sqrt(max(variance, 0.0)), x0_gain=_x0_gain(c.x_coef, c.m_coef, px, pm))
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
        c = dataclasses.replace(c, sigma=math.sqrt((1.0 - a_prev) / (1.0 - a) * beta),
                                x0_gain=_x0_gain(c.x_coef, c.m_coef, px, pm))
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
        if pred == "epsilon":  # x0 = x - sigma_hat m
            a, b, px, pm = 1.0, dt, 1.0, -sigma_hat
        elif pred == "v_prediction":  # x0 = x / s2 - sigma m / sqrt(s2)
            s2 = sigma**2 + 1.0
            a, b = 1.0 + dt * (1.0 - 1.0 / s2) / sigma_hat, dt * sigma / (math.sqrt(s2) * sigma_hat)
            px, pm = 1.0 / s2, -sigma / math.sqrt(s2)
        else:  # x0 = m
            a, b, px, pm = 1.0 + dt / sigma_hat, -dt / sigma_hat, 0.0, 1.0
        churn = s_noise * math.sqrt(max(sigma_hat**2 - sigma**2, 0.0))
        c = StepCoefficients(float(t), in_scale=1.0 / math.sqrt(sigma**2 + 1.0), x_coef=a, m_coef=b,
                             sigma=_ancestral_std(sigma_hat, sigma_next), x0_gain=_x0_gain(a, b, px, pm))
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
    sigmas = [float(v) for v in sched.sigmas.tolist()]
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
            sg, sg_next = sigmas[i], sigmas[i + 1]  # variance exploding; the state is scaled by alpha_next
            steps.append(StepCoefficients(t, x_coef=a + c[0] * p, m_coef=c[0] * q, hist_coefs=tuple(c[1:]),
                                          hist_x_coef=p, hist_m_coef=q, x0_gain=a,
                                          sigma=_ancestral_std(sg, sg_next) / math.sqrt(1.0 + sg_next**2)))
        else:
            return SamplerPlan(name, tuple(steps), ts.dtype, float(sched.init_noise_sigma), False, None,
                               history=history)
    raise NotImplementedError(f"sampling_loop: {name} with this config reads more than 3 previous predictions")


def _with_noise(c: StepCoefficients, coef: float, draws: bool) -> StepCoefficients:
    return dataclasses.replace(c, noise_coef=coef if draws else 0.0, draws_noise=draws)


def _ancestral_std(s: float, s_next: float) -> float:
    """The posterior standard deviation between variance-exploding noise levels `s -> s_next`."""
    if s <= 0.0 or s_next <= 0.0:
        return 0.0
    return s_next * math.sqrt(max(1.0 - (s_next / s) ** 2, 0.0))


def noise_levels(plan: SamplerPlan) -> tuple[float, ...]:
    """Each step's `sigma`, with zeros (a last step to a clean sample) raised to the smallest positive one, so
    that rule="sigma" holds that step to the noise level of the step before it (all ones if none is positive)."""
    positive = [s.sigma for s in plan.steps if s.sigma > 0.0]
    floor = min(positive, default=1.0)
    return tuple(max(s.sigma, floor) for s in plan.steps)


@dataclass(frozen=True)
class SchedulerSupport:
    """A supported scheduler: the keyword arguments its `step` takes (with diffusers' defaults) and the planner
    that reads its per-step constants."""

    step_kwargs: dict
    plan: Any  # (scheduler after set_timesteps, **step_kwargs) -> SamplerPlan


# The one registry of supported schedulers (`sampling_loop`, the class check and the docs read it).
SCHEDULERS = {
    "DDIMScheduler": SchedulerSupport({"eta": 0.0, "use_clipped_model_output": False}, _plan_ddim),
    "DDPMScheduler": SchedulerSupport({}, _plan_ddpm),
    "EulerDiscreteScheduler": SchedulerSupport({"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"),
                                                "s_noise": 1.0}, _plan_euler),
    "DPMSolverMultistepScheduler": SchedulerSupport({}, _plan_multistep),
}
SUPPORTED_SCHEDULERS = tuple(SCHEDULERS)
