"""`parallel_sample`: a `SamplingLoop`'s sampler solved in parallel rounds, all steps batched into one denoiser call.

The chain is the loop's own step (see the package docstring); the state carried from step to step is the
sample and, for multistep samplers, the last `history` data predictions, packed `(B, (1 + history) * D)`.
A round evaluates `n` steps at once by folding the steps into the denoiser's batch: `n * B` samples with
one timestep each (diffusers' UNets take a `(batch,)` timestep tensor), every per-step constant as an `(n,)`
tensor in the latents' dtype, applied in the eager loop's order, so a step evaluated in a batch rounds as
the same step evaluated alone. With classifier-free guidance the one call has `2 n B` samples: `cat([X, X])` of
the `n B` batched ones, the conditioning's negative and positive halves each tiled `n` times to line up
(``pcr_compile/diffusion/guidance.py`` `expand_conditioning`); the solve's state stays the `B` guided latents.
No `torch.compile` is involved (a CPU compile of a UNet sampler takes minutes); the solver is
``pcr_compile.solver.sampler`` (never more rounds than steps, Anderson / Picard, the exact or the noise-level
stopping rule).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pcr_compile.diffusion.guidance import check_conditioning, expand_conditioning
from pcr_compile.diffusion.loop import SamplingLoop
from pcr_compile.diffusion.plans import noise_levels
from pcr_compile.solver import sampler as sampler_solve
from pcr_compile.solver.newton import default_tol
from pcr_compile.solver.sampler import SamplerStats

# rule="sigma": the default tolerance of a step's RMS defect against its noise level (measured on the fixture,
# README: DDIM-50/100 error ~1e-3 relative to the sequential result, at about half the exact rule's rounds).
DEFAULT_SIGMA_TOL = 1e-2


class BatchedSteps:
    """The loop's steps as a batched map over packed states, for one call (latents, noise, unet kwargs)."""

    def __init__(self, loop: SamplingLoop, latents: torch.Tensor, noise: torch.Tensor | None,
                 unet_kwargs: dict[str, Any]):
        plan = self.plan = loop.plan
        self.loop, self.kwargs = loop, unet_kwargs
        self.shape, self.dtype, self.device = tuple(latents.shape), latents.dtype, latents.device
        self.B, self.D, self.K = latents.shape[0], latents[0].numel(), plan.history
        steps = plan.steps

        def col(name):
            return torch.tensor([getattr(s, name) for s in steps], dtype=torch.float64).to(self.dtype).to(self.device)

        self.c = {k: col(k) for k in ("in_scale", "x_coef", "m_coef", "clip_coef", "x0_x_coef", "x0_m_coef",
                                      "noise_coef", "hist_x_coef", "hist_m_coef")}
        self.hist = torch.tensor([list(s.hist_coefs) + [0.0] * (self.K - len(s.hist_coefs)) for s in steps],
                                 dtype=torch.float64).reshape(len(steps), self.K).to(self.dtype).to(self.device)
        self.t = torch.tensor([s.timestep for s in steps], dtype=plan.timestep_dtype, device=self.device)
        self.noise = noise

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The initial packed state (B, (1 + K) D): the latents, then zero histories."""
        flat = x.reshape(self.B, self.D)
        return torch.cat([flat] + [torch.zeros_like(flat)] * self.K, dim=-1)

    def __call__(self, start: int, Zprev: torch.Tensor) -> torch.Tensor:
        """F for steps start .. start + n from Zprev (n, r B, (1 + K) D), in the latents' dtype: r copies of the
        batch side by side (r candidate iterates, `jacobian="auto"`) share the noise and the unet kwargs."""
        plan, n, B = self.plan, Zprev.shape[0], self.B
        rows = Zprev.shape[1]
        if rows % B:
            raise ValueError(f"BatchedSteps: {rows} rows is not a multiple of the batch {B}")
        r = rows // B
        shape = (rows, *self.shape[1:])
        Zp = Zprev.to(self.dtype).reshape(n, rows, 1 + self.K, self.D)
        x = Zp[:, :, 0].reshape(n, *shape)  # (n, rows, ...)
        hist = [Zp[:, :, 1 + k].reshape(n, *shape) for k in range(self.K)]
        view = (n,) + (1,) * len(shape)
        c = {k: v[start: start + n].reshape(view) for k, v in self.c.items()}
        xin = x * c["in_scale"] if plan.scales_input else x
        t = self.t[start: start + n].repeat_interleave(rows)
        kwargs = expand_conditioning(self.kwargs, B, n * r, self.loop.guidance)  # guidance: doubled in _denoise
        m = self.loop._denoise(xin.reshape(n * rows, *shape[1:]), t, kwargs).reshape(n, *shape)
        terms = []  # the eager loop's terms, in its order (SamplingLoop.forward)
        if plan.uses_x:
            terms.append(x * c["x_coef"])
        if plan.uses_m:
            terms.append(m * c["m_coef"])
        if plan.clip_range is not None:
            x0 = (x * c["x0_x_coef"] + m * c["x0_m_coef"]).clamp(-plan.clip_range, plan.clip_range)
            terms.append(x0 * c["clip_coef"])
        if plan.stochastic:
            noise = self.noise[start: start + n]
            terms.append((noise.repeat(1, r, *([1] * (noise.dim() - 2))) if r > 1 else noise) * c["noise_coef"])
        terms += [h * self.hist[start: start + n, k].reshape(view) for k, h in enumerate(hist)]
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        new_hist = [x * c["hist_x_coef"] + m * c["hist_m_coef"]] + hist[:-1] if self.K else []
        parts = [p.reshape(n, rows, self.D) for p in [out, *new_hist]]
        return torch.cat(parts, dim=-1)


def _check_latents(loop: SamplingLoop, latents: Any) -> None:
    """A clear error, naming `latents`, for what the denoiser would otherwise reject deep inside its first call."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if latents.dim() < 1:
        raise ValueError("latents must have a batch dimension, got a 0-d tensor")
    unet = loop.unet
    channels = getattr(getattr(unet, "config", None), "in_channels", None)
    if isinstance(channels, int) and (latents.dim() < 2 or latents.shape[1] != channels):
        raise ValueError(f"latents must be (batch, {channels}, ...) for this unet (config.in_channels={channels}), "
                         f"got shape {tuple(latents.shape)}")
    out_channels = getattr(getattr(unet, "config", None), "out_channels", None)
    if isinstance(channels, int) and isinstance(out_channels, int) and out_channels != channels:
        raise ValueError(f"the unet outputs {out_channels} channels for {channels} input channels (config.out_channels"
                         f"); the sampler steps take a model output of the sample's shape"
                         f"{' (a learned variance: not supported)' if out_channels == 2 * channels else ''}")
    dtype = getattr(unet, "dtype", None)  # diffusers models: the parameters' dtype, which their input must match
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != latents.dtype:
        raise ValueError(f"latents are {latents.dtype} but the unet is {dtype}; pass latents of the unet's dtype")


def parallel_sample(loop: SamplingLoop, latents: torch.Tensor, *, generator: Any = None,
                    noise: torch.Tensor | None = None, tol: float | None = None, rule: str = "exact",
                    accel: str = "auto", history: int = sampler_solve.DEFAULT_HISTORY, window: int = 0,
                    max_iters: int | None = None, on_round=None, jacobian: str = "auto", **unet_kwargs: Any
                    ) -> tuple[torch.Tensor, SamplerStats]:
    """`loop(latents, generator=..., noise=..., **unet_kwargs)` by the parallel sampler solve.

    Args:
        loop: a `SamplingLoop` (from `sampling_loop`) whose denoiser takes a `(batch,)` timestep tensor.
        latents: the initial sample, already scaled by `loop.init_noise_sigma`.
        generator, noise: the stochastic samplers' noise, exactly as `SamplingLoop.forward` takes it.
        **unet_kwargs: the unet's keywords, as `SamplingLoop.forward` takes them; with guidance,
            `encoder_hidden_states=cat([negative_prompt_embeds, prompt_embeds])` (2 x the latents' batch).
        tol: the stopping tolerance; None: the dtype's default for rule="exact" (float32 1e-6, as the
            backend), `DEFAULT_SIGMA_TOL` for rule="sigma".
        rule: "exact" (each step's defect against its own size, ``pcr_compile/solver/residual.py``) or "sigma" (against
            the scheduler's noise level at that step, as ParaDiGMS).
        accel: "auto" (triangular Anderson with a measured safeguard), "anderson", or "picard".
        jacobian: the linearisation of each step in the update: "identity" (Picard, mixed by `accel`),
            "scalar" (Newton with each step's scalar Jacobian, measured by secants along the updates and
            started from the scheduler's `x0_gain`; no Anderson mixing unless accel="anderson"), or "auto" (the
            default: both run side by side in one batched call for the first rounds, then the one whose step
            residuals fell further is kept; ``pcr_compile/solver/sampler.py``).
        history: Anderson's history length. window: steps per round (0: all).
        max_iters: most rounds before finishing sequentially (None: the number of steps).
        on_round: `on_round(committed_steps, steps)` after each round (a progress bar).

    Returns:
        `(sample, stats)`: the final sample in the latents' dtype and the solve's `SamplerStats` (`evaluations`:
        rounds, i.e. batched denoiser calls; `sequential_steps`: steps of a sequential finish; `depth`;
        `step_evaluations`, the denoiser work in steps, both candidates' rows counted while jacobian="auto"
        races them; `chosen`, the candidate kept). An empty batch is returned as it is, with no rounds.

    Raises:
        TypeError / ValueError, naming the argument: a bad option (tol must be finite and positive), noise of the
        wrong shape, latents that are not a floating-point tensor, or (a diffusers unet) whose channels or dtype
        are not the unet's, or a unet whose output channels are not its input channels (a learned variance).
    """
    if not isinstance(loop, SamplingLoop):
        raise TypeError(f"loop must be a SamplingLoop (from sampling_loop), got {type(loop).__name__}")
    if rule not in sampler_solve.RULES:
        raise ValueError(f"rule must be one of {sampler_solve.RULES}, got {rule!r}")
    if accel not in sampler_solve.ACCELERATIONS:
        raise ValueError(f"accel must be one of {sampler_solve.ACCELERATIONS}, got {accel!r}")
    if jacobian not in sampler_solve.JACOBIANS:
        raise ValueError(f"jacobian must be one of {sampler_solve.JACOBIANS}, got {jacobian!r}")
    for key, v, lo in (("history", history, 0), ("window", window, 0), ("max_iters", max_iters, 0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf):
        raise ValueError(f"tol must be None or a finite positive number, got {tol!r}")
    _check_latents(loop, latents)
    plan = loop.plan
    L = len(plan.steps)
    if plan.stochastic:
        if noise is None:
            noise = loop.draw_noise(latents, generator)
        elif tuple(noise.shape) != (L, *latents.shape):
            raise ValueError(f"noise must have shape {(L, *latents.shape)}, got {tuple(noise.shape)}")
    elif noise is not None:
        raise ValueError(f"{plan.scheduler} with these settings is deterministic; it takes no noise")
    check_conditioning(unet_kwargs, latents.shape[0], loop.guidance)
    if latents.shape[0] == 0:  # nothing to sample (the sequential loop returns the empty batch too)
        return latents.clone(), SamplerStats(converged=True, chosen="")
    steps = BatchedSteps(loop, latents, noise, unet_kwargs)
    solve_dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
    if tol is None:
        tol = DEFAULT_SIGMA_TOL if rule == "sigma" else default_tol(latents.dtype)
    sigma = torch.tensor(noise_levels(plan), dtype=solve_dtype, device=latents.device)
    gain = torch.tensor([st.x0_gain for st in plan.steps], dtype=solve_dtype, device=latents.device)
    with torch.no_grad():
        Z, stats = sampler_solve.sampler_forward(
            steps.pack(latents), L, steps, tol=tol, rule=rule, sigma=sigma, accel=accel, history=history,
            max_iters=L if max_iters is None else max_iters, window=window, solve_dtype=solve_dtype,
            parts=[steps.D] * (1 + steps.K), integrating=[True] + [False] * steps.K, on_round=on_round,
            jacobian=jacobian, gain=gain, stacked_rows=True)
    return Z[-1, :, : steps.D].to(latents.dtype).reshape(latents.shape), stats
