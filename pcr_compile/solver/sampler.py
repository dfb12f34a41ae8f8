"""Parallel solve of a diffusion sampler's chain that is never worse than sequential sampling.

The chain `z_l = f_l(z_{l-1})`, l = 1..L, on packed states `(L, B, w)` as in ``newton.py``; here `f_l`
is one sampler step (a denoiser call and the scheduler's update). Each *round* evaluates every step of the
window at the current guess in one batched call, `F_l = f_l(Z_{l-1})`, reads the per-step residuals once, and
updates the guess.

Update. The base iteration is Picard in ParaDiGMS's form (Shih et al. 2023), the identity-Jacobian Newton
step of ``newton.py``: with `g = F - Z`, `Z <- Z + cumsum(g)`. On top of it, `accel="anderson"` applies
triangular Anderson acceleration (ParaTAA, Tang et al., ICML 2024, Sec. 4): with the last `m` rounds'
differences of iterates `dX` and of Picard residuals `dR` (`R = cumsum(g)`), step l mixes

    z_l <- z_l + R_l - sum_i gamma_{l,i} (dX_{l,i} + dR_{l,i}),   gamma_l = argmin || R_{<=l} - dR_{<=l} gamma ||

where the least squares of step l reads only steps <= l (the cumulative Gram matrices, regularised), so
step l's update depends on earlier steps only, as the sequential computation does. `accel="auto"` is
Anderson with a measured safeguard: a round whose residual grew by more than 2x clears the history and
takes a plain Picard step.

Never worse than sequential (issue 16):
- Progress: step `s` (the first not yet accepted) is evaluated at the accepted state before it, so `F_s` is
  exact; every round commits the accepted prefix *and* that step. A solve therefore takes at most `L - s_0`
  rounds, and the sequential finish (below) starts from the committed prefix: rounds + sequential steps
  never exceed L.
- Evaluations: a round evaluates at most `window` steps (the unfinished ones) and there are at most
  `max_iters + 1` rounds, so the denoiser runs at most `(max_iters + 1) * window` step evaluations besides
  the sequential finish (`parallel_sample`: `max_iters` = L; measured 5-30 L on the fixture, RESULTS.md).
- No blow-up: the guesses beyond the committed prefix are clamped to `clamp_factor` times the largest
  committed state (`max |z|` over z_0 and the committed steps); committed steps are never clamped, so the fixed
  point is unchanged wherever the true trajectory stays within that bound, and progress is kept regardless.
- Divergence is detected early: a round whose residual is `1e4 x` the best so far (after two rounds without
  improvement) restarts the suffix from the committed state with an empty history; a second such event,
  non-finite residuals, or `patience` rounds without a new best mean log residual over the unaccepted steps,
  finish sequentially.

Stopping: `rule="exact"` is the project's one rule (``residual.py`` `step_residuals`);
`rule="sigma"` is its documented second rule `sigma_residuals` against the per-step noise levels `sigma`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .newton import SolveStats
from .residual import host_values, sigma_residuals, step_residuals

log = logging.getLogger(__name__)

ACCELERATIONS = ("auto", "anderson", "picard")
RULES = ("exact", "sigma")
DEFAULT_HISTORY = 4
DIVERGED = 1e4  # a residual this many times the best so far is divergence


@dataclass
class SamplerStats(SolveStats):
    """`SolveStats` plus the denoiser work: `step_evaluations` counts single-step evaluations (a round over n
    steps counts n; each sequential step one), to compare with sequential sampling's L."""

    step_evaluations: int = 0

    @property
    def depth(self) -> int:
        """Sequential depth: rounds (batched calls) plus the steps of a sequential finish; at most L."""
        return self.evaluations + self.sequential_steps


def _prefix(rho: list[float], tol: float) -> int:
    for i, x in enumerate(rho):
        if not x <= tol:
            return i
    return len(rho)


def _anderson(Z, R, dX, dR, lam: float = 1e-8) -> torch.Tensor:
    """Triangular Anderson mixing; `Z`, `R` `(n, B, w)`, `dX`, `dR` `(m, n, B, w)`. Per row b and step l, gamma
    from the Gram matrices of steps <= l."""
    m = dR.shape[0]
    G = torch.einsum("inbw,jnbw->nbij", dR, dR).cumsum(0)  # (n, B, m, m)
    v = torch.einsum("inbw,nbw->nbi", dR, R).cumsum(0)  # (n, B, m)
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-300)  # (n, B, 1)
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    gamma = torch.linalg.solve(G + lam * scale.unsqueeze(-1) * eye, v.unsqueeze(-1)).squeeze(-1)  # (n, B, m)
    gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
    return Z + R - torch.einsum("nbi,inbw->nbw", gamma, dX + dR)


def sampler_forward(
    z0: torch.Tensor,
    length: int,
    evaluate: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    tol: float,
    rule: str = "exact",
    sigma: torch.Tensor | None = None,
    accel: str = "auto",
    history: int = DEFAULT_HISTORY,
    max_iters: int = 50,
    window: int = 0,
    solve_dtype: torch.dtype = torch.float32,
    parts: list[int] | None = None,
    clamp_factor: float = 10.0,
    patience: int = 16,
    on_round: Callable[[int, int], None] | None = None,
    integrating: list[bool] | None = None,
) -> tuple[torch.Tensor, SamplerStats]:
    """Solve the sampler chain from packed `z0` `(B, w)`; returns the trajectory `(L, B, w)` and the stats.

    `evaluate(start, Zprev)` returns `F` for steps `start .. start + len(Zprev)` in one batched call (also used
    with one step for the sequential finish). `sigma` `(L,)`: the noise level of each step (rule="sigma").
    `on_round(committed, L)` is called after every round and every sequential step (a progress bar).
    `integrating` (one bool per entry of `parts`): which carried tensors evolve as `z + drift` (Picard's
    identity Jacobian, the default for all); the others (a multistep sampler's stored predictions, remade or
    copied every step) take the Jacobi update `z <- F`, their Jacobian with respect to themselves being ~0.
    `SolveStats.iterations` counts rounds, `evaluations` batched calls, `sequential_steps` the finish.
    """
    if accel not in ACCELERATIONS:
        raise ValueError(f"accel must be one of {ACCELERATIONS}, got {accel!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "sigma" and (sigma is None or sigma.shape != (length,)):
        raise ValueError(f"rule='sigma' needs sigma of shape ({length},), got "
                         f"{None if sigma is None else tuple(sigma.shape)}")
    stats = SamplerStats()
    L = length
    jacobi = None  # (w,) True for the features of non-integrating parts
    if integrating is not None and not all(integrating):
        if parts is None or len(parts) != len(integrating):
            raise ValueError(f"integrating needs one bool per part, got {len(integrating)} for parts {parts}")
        jacobi = torch.cat([torch.full((n,), not keep, dtype=torch.bool, device=z0.device)
                            for n, keep in zip(parts, integrating)])
    P = window if 0 < window < L else L
    z_prev = z0.to(solve_dtype)
    bound = clamp_factor * float(host_values(z_prev.abs().amax())) if z_prev.numel() else 0.0
    Z = torch.empty((L, *z_prev.shape), dtype=solve_dtype, device=z0.device)
    Zw = z_prev.unsqueeze(0).expand(P, *z_prev.shape).clone()
    dX: list[torch.Tensor] = []
    dR: list[torch.Tensor] = []
    last: tuple[torch.Tensor, torch.Tensor] | None = None  # (Z, R) of the previous round, same window rows
    s, best, best_level, since_best, restarts, prev_res = 0, math.inf, math.inf, 0, 0, math.inf
    mixing = accel in ("auto", "anderson") and history > 0
    while s < L:
        n = min(P, L - s)
        Zw = Zw[:n]
        Zprev = torch.cat([z_prev.unsqueeze(0), Zw[:-1]], dim=0)
        F = evaluate(s, Zprev).to(solve_dtype)
        stats.evaluations += 1
        stats.step_evaluations += n
        g = F - Zw
        if rule == "sigma":
            rho_t = sigma_residuals(g, sigma[s: s + n], parts)
        else:
            rho_t = step_residuals(g, F, parts)
        rho = host_values(rho_t)  # the round's one host read
        p = _prefix(rho, tol)
        res = max(rho[p:], default=0.0)
        # progress: the mean log residual of the unaccepted steps (the max is not monotone under Picard: the
        # suffix's residuals grow while the front converges)
        level = sum(math.log(max(x, 1e-300)) for x in rho[p:]) / max(n - p, 1) if math.isfinite(res) else math.inf
        stats.residuals.append(max(rho, default=0.0))
        stats.residual = stats.residuals[-1]
        if p == n:  # the whole window is accepted
            Z[s: s + n] = Zw
            s, z_prev = s + n, Zw[-1]
            Zw = z_prev.unsqueeze(0).expand(P, *z_prev.shape).clone()
            dX, dR, last = [], [], None
            if on_round:
                on_round(s, L)
            continue
        # Health of the unaccepted suffix, measured before anything else this round.
        if not math.isfinite(res):
            stats.reason = "non-finite residual"
        elif stats.iterations >= max_iters:
            stats.reason = f"max_iters={max_iters} reached"
        else:
            if res < best:
                best = res
            if level < best_level:
                best_level, since_best = level, 0
            else:
                since_best += 1
            if res > DIVERGED * best and since_best >= 2:
                restarts += 1
                if restarts > 1:
                    stats.reason = "diverging"
                else:
                    log.debug("sampler solve: residual %.3g after best %.3g; restarting the suffix", res, best)
            elif since_best >= patience:
                stats.reason = f"no progress in {since_best} rounds"
        # Commit the accepted prefix and the exact step after it.
        q = p + 1
        Z[s: s + p] = Zw[:p]
        Z[s + p] = F[p]
        z_prev = F[p]
        bound = max(bound, clamp_factor * float(host_values(z_prev.abs().amax())))  # same read as rho's
        if stats.reason:
            s += q
            break
        stats.iterations += 1
        if restarts and since_best >= 2 and res > DIVERGED * best:  # restart: a fresh guess after the prefix
            rest = z_prev.unsqueeze(0).expand(n - q, *z_prev.shape).clone()
            dX, dR, last, best, best_level, since_best = [], [], None, math.inf, math.inf, 0
        else:
            g[:p] = 0  # row p's own defect stays: the rows after it move with the exact step
            R = g.cumsum(0)[q:]  # Picard (identity-Jacobian Newton) update of the unaccepted rows
            if jacobi is not None:
                R = torch.where(jacobi, g[q:], R)
            Zr = Zw[q:]
            if mixing and last is not None:
                dX = [d[q:] for d in dX[max(len(dX) - history + 1, 0):]] + [Zr - last[0][q:]]
                dR = [d[q:] for d in dR[max(len(dR) - history + 1, 0):]] + [R - last[1][q:]]
                if accel == "auto" and res > 2.0 * prev_res:  # the mixed step made things worse: plain Picard
                    dX, dR = [], []
            rest = _anderson(Zr, R, torch.stack(dX), torch.stack(dR)) if mixing and dX else Zr + R
            if mixing:
                last = (Zr, R)
        prev_res = res
        if bound > 0:
            rest = rest.clamp(-bound, bound)
        s += q
        # The next window: the unaccepted rows, then guesses (the last state repeated) for the steps it gains.
        k = min(P, L - s)
        Zw = torch.cat([rest[: k], z_prev.unsqueeze(0).expand(max(k - rest.shape[0], 0), *z_prev.shape)], dim=0)
        if mixing and last is not None and k != rest.shape[0]:
            dX, dR, last = [], [], None  # histories cover the old rows only; the window moved onto new steps
        if on_round:
            on_round(s, L)
    stats.prefix = min(s, L)
    if s >= L:
        stats.converged = True
        return Z, stats
    stats.fell_back = True
    log.debug("sampler solve finishes sequentially after %d rounds (%s); prefix %d of %d", stats.iterations,
              stats.reason, s, L)
    stats.sequential_steps = L - s
    for l in range(s, L):
        z_prev = evaluate(l, z_prev.unsqueeze(0))[0].to(solve_dtype)
        stats.step_evaluations += 1
        Z[l] = z_prev
        if on_round:
            on_round(l + 1, L)
    return Z, stats
