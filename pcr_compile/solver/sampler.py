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

Scalar Newton, `jacobian="scalar"`. Picard linearises every step as the identity. A DDIM step
`x' = c_x x + c_e eps(x)` has the Jacobian `c_x I + c_e d eps / dx`; with the predicted clean sample held
fixed it is `sqrt(1 - a') / sqrt(1 - a) I` (the ratio of the noise levels; `StepCoefficients.x0_gain` for
every scheduler), and in general something else. This update keeps one scalar `J_l` per step and row and
takes the Newton step of the chain linearised with it, `delta_l = g_l + J_l delta_{l-1}` (row `p`, the
committed step, moves to the committed state): a linear recurrence with scalar coefficients, solved by the
same parallel scan as the other solves (``kernels.linear_recurrence``, structure "diagonal"), no denoiser
call. `J_l` starts from `gain` (the scheduler's `x0_gain`; ones when none is given) and is *measured* from the
second round on: the secant slope `<dF_l, dZ_{l-1}> / <dZ_{l-1}, dZ_{l-1}>` between the step's last two
evaluations, the Rayleigh quotient of the step's Jacobian along the last update (free: it reuses the two
rounds' batched calls), clamped to `GAIN_RANGE`. On the trained fixture's DDIM-100 Jacobians (computed in
full) the true per-step Jacobians have eigenvalues spread over about [0.6, 1.03] at step 90, so no scalar is
exact; Newton with the exact (dense) Jacobians of the converged trajectory took 11 rounds at tol 1e-4 where
this takes 18 and Picard + Anderson 19 (RESULTS.md). Non-integrating parts (a multistep sampler's stored
predictions) keep the Jacobi update.

Choosing, `jacobian="auto"`. Which of the two converges faster depends on the chain (on the fixture scalar
Newton wins on DDIM, DDPM and Euler, Picard + Anderson on DPM-Solver++ at 50 / 100 steps), so "auto" races
them: each round evaluates both candidates' windows in *one* batched call (`stacked_rows`: the rows of the
two guesses side by side, 2x the denoiser work, the same number of rounds; the first round, where both
guesses are equal, is evaluated once). Both share one committed prefix: the candidate with the longer
accepted prefix (then the lower mean log residual over its unaccepted steps) leads the round, its prefix and
exact next step are committed, and the other candidate's guesses follow that committed state. After
`RACE_ROUNDS` = 8 rounds the candidate whose mean log step residual (over the whole window), averaged over
the last `RACE_WINDOW` = 3 rounds, is lower is kept and the other dropped (`SamplerStats.chosen`). The
numbers are the ones measured best among the rules tried on the fixture's 45 solves (5 schedulers x 25/50/100
steps x 3 tolerances): this one lost 4 rounds in total against always picking the faster candidate (one wrong
pick: clipped DDIM-50 at tol 1e-3); deciding after 4 rounds lost 36 to 66.

Never worse than sequential (issue 16):
- Progress: step `s` (the first not yet accepted) is evaluated at the accepted state before it, so `F_s` is
  exact; every round commits the accepted prefix *and* that step. A solve therefore takes at most `L - s_0`
  rounds, and the sequential finish (below) starts from the committed prefix: rounds + sequential steps
  never exceed L.
- Evaluations: a round evaluates at most `window` steps (the unfinished ones; twice that while
  jacobian="auto" races) and there are at most `max_iters + 1` rounds, so the denoiser runs at most
  `(max_iters + 1) * window` (x2 for the race's rounds) step evaluations besides the sequential finish
  (`parallel_sample`: `max_iters` = L; measured 5-30 L on the fixture, RESULTS.md).
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
from dataclasses import dataclass, field

import torch

from pcr_compile.kernels import linear_recurrence

from .newton import SolveStats
from .residual import host_values, sigma_residuals, step_residuals

log = logging.getLogger(__name__)

ACCELERATIONS = ("auto", "anderson", "picard")
JACOBIANS = ("identity", "scalar", "auto")
RULES = ("exact", "sigma")
DEFAULT_HISTORY = 4
DIVERGED = 1e4  # a residual this many times the best so far is divergence
GAIN_RANGE = (0.0, 1.5)  # measured scalar Jacobians are clamped to this range
RACE_ROUNDS = 8  # jacobian="auto": rounds both candidates run side by side before one is kept
RACE_WINDOW = 3  # ... and the last rounds whose residual levels decide


@dataclass
class SamplerStats(SolveStats):
    """`SolveStats` plus the denoiser work: `step_evaluations` counts single-step evaluations (a round over n
    steps counts n; each sequential step one), to compare with sequential sampling's L."""

    step_evaluations: int = 0
    candidates: list = field(default_factory=list)  # "jacobian/accel" of each candidate iteration run
    chosen: str = ""  # the one whose iterates were kept (jacobian="auto": the race's winner)

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
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)  # (n, B, 1)
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    gamma, info = torch.linalg.solve_ex(G + lam * scale.unsqueeze(-1) * eye, v.unsqueeze(-1))
    # A singular system (collinear history; in float32 the regulariser is below rounding) gives that step and row
    # no mixing, the plain Picard step, rather than an error.
    gamma = torch.where((info == 0).unsqueeze(-1), gamma.squeeze(-1), torch.zeros_like(v))  # (n, B, m)
    gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
    return Z + R - torch.einsum("nbi,inbw->nbw", gamma, dX + dR)


def _secant(gains, Zprev, F, seenZ, seenF, seen, integ) -> None:
    """Measure each step's scalar Jacobian along the last update, in place: the secant slope
    `<dF, dZ> / <dZ, dZ>` between this round's `(Zprev, F)` and the previous round's at the same step, per row,
    over the integrating features (a Rayleigh quotient of the step's Jacobian along the move); kept where the
    step's input moved by more than rounding, else the previous gain stays."""
    Zi, Fi = (Zprev, F) if integ is None else (Zprev[..., integ], F[..., integ])
    dZ, dF = Zi - seenZ, Fi - seenF
    zz, fz = (dZ * dZ).sum(-1), (dF * dZ).sum(-1)  # (n, B)
    eps = torch.finfo(Zi.dtype).eps
    moved = seen.unsqueeze(1) & (zz > (1e3 * eps) ** 2 * (Zi * Zi).sum(-1))
    slope = (fz / torch.where(moved, zz, torch.ones_like(zz))).clamp(*GAIN_RANGE)
    gains.copy_(torch.where(moved, slope, gains))
    seenZ.copy_(Zi)
    seenF.copy_(Fi)
    seen.fill_(True)


@dataclass
class _Lane:
    """One candidate iteration's state: its guesses for the window and its accelerator's history."""

    accel: str
    jacobian: str  # "identity" or "scalar"
    Zw: torch.Tensor
    gains: torch.Tensor | None = None  # (L, B) scalar Jacobians (jacobian="scalar")
    seen: tuple | None = None  # (Zprev, F, evaluated?) of the previous round, per step (jacobian="scalar")
    dX: list = field(default_factory=list)
    dR: list = field(default_factory=list)
    last: tuple | None = None  # (Z, R) of the previous round, same window rows
    prev_res: float = math.inf
    levels: list = field(default_factory=list)  # mean log step residual of each round (jacobian="auto")

    def forget(self):
        self.dX, self.dR, self.last = [], [], None


def _new_lane(accel, jacobian, Zw, L, gain, integ):
    lane = _Lane(accel, jacobian, Zw)
    if jacobian == "scalar":
        B, dtype, dev = Zw.shape[1], Zw.dtype, Zw.device
        prior = torch.ones(L, dtype=dtype, device=dev) if gain is None else gain.to(dtype=dtype, device=dev)
        lane.gains = prior.unsqueeze(1).expand(L, B).clone()
        wI = Zw.shape[-1] if integ is None else int(integ.sum())
        lane.seen = (torch.zeros((L, B, wI), dtype=dtype, device=dev), torch.zeros((L, B, wI), dtype=dtype, device=dev),
                     torch.zeros(L, dtype=torch.bool, device=dev))
    return lane


def _update(lane: _Lane, g: torch.Tensor, s: int, n: int, q: int, res: float, history: int, jacobi) -> torch.Tensor:
    """The lane's next guesses for the unaccepted rows `q..n` from its defects `g` (rows before the committed
    step zeroed, the committed step's row its move to the committed state)."""
    if lane.jacobian == "scalar":  # Newton with each step's scalar Jacobian: delta_l = g_l + J_l delta_{l-1}
        A = lane.gains[s: s + n].unsqueeze(-1).expand(g.shape).contiguous()
        R = linear_recurrence(A, g, structure="diagonal")[q:]
    else:
        R = g.cumsum(0)[q:]  # Picard (identity-Jacobian Newton) update of the unaccepted rows
    if jacobi is not None:
        R = torch.where(jacobi, g[q:], R)
    Zr = lane.Zw[q:]
    mixing = lane.accel in ("auto", "anderson") and history > 0
    if mixing and lane.last is not None:
        lane.dX = [d[q:] for d in lane.dX[max(len(lane.dX) - history + 1, 0):]] + [Zr - lane.last[0][q:]]
        lane.dR = [d[q:] for d in lane.dR[max(len(lane.dR) - history + 1, 0):]] + [R - lane.last[1][q:]]
        if lane.accel == "auto" and res > 2.0 * lane.prev_res:  # the mixed step made things worse: plain Picard
            lane.dX, lane.dR = [], []
    rest = _anderson(Zr, R, torch.stack(lane.dX), torch.stack(lane.dR)) if mixing and lane.dX else Zr + R
    if mixing:
        lane.last = (Zr, R)
    lane.prev_res = res
    return rest


def _mean_log(values) -> float:
    """The mean log of residuals (0 for none); the solve's measure of progress."""
    return sum(math.log(max(x, 1e-300)) for x in values) / max(len(values), 1)


def _race_winner(lanes) -> int:
    """The candidate with the lowest mean, over the last `RACE_WINDOW` rounds, of its mean log step residual
    over the window (the first on ties)."""
    return min(range(len(lanes)), key=lambda i: sum(lanes[i].levels[-RACE_WINDOW:]))


def _guess(z_prev, n):
    """The first guess for `n` steps the window gains: the last committed state repeated."""
    return z_prev.unsqueeze(0).expand(n, *z_prev.shape).clone()


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
    jacobian: str = "identity",
    gain: torch.Tensor | None = None,
    stacked_rows: bool = False,
) -> tuple[torch.Tensor, SamplerStats]:
    """Solve the sampler chain from packed `z0` `(B, w)`; returns the trajectory `(L, B, w)` and the stats.

    `evaluate(start, Zprev)` returns `F` for steps `start .. start + len(Zprev)` in one batched call (also used
    with one step for the sequential finish). `sigma` `(L,)`: the noise level of each step (rule="sigma").
    `on_round(committed, L)` is called after every round and every sequential step (a progress bar).
    `integrating` (one bool per entry of `parts`): which carried tensors evolve as `z + drift` (Picard's
    identity Jacobian, the default for all); the others (a multistep sampler's stored predictions, remade or
    copied every step) take the Jacobi update `z <- F`, their Jacobian with respect to themselves being ~0.
    `jacobian`: "identity" (Picard, with `accel`'s Anderson mixing), "scalar" (Newton with each step's
    measured scalar Jacobian, starting from `gain` `(L,)`, default ones; Anderson-mixed only with
    accel="anderson"), or "auto" (both raced, see the module
    docstring; needs `stacked_rows`: `evaluate` takes `(n, k B, w)`, k candidates' rows side by side).
    `SolveStats.iterations` counts rounds, `evaluations` batched calls, `sequential_steps` the finish.
    """
    if accel not in ACCELERATIONS:
        raise ValueError(f"accel must be one of {ACCELERATIONS}, got {accel!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if jacobian == "auto" and not stacked_rows:
        raise ValueError("jacobian='auto' races two candidates in one batched call: it needs stacked_rows=True "
                         "(an evaluate that takes the candidates' rows side by side)")
    if gain is not None and tuple(gain.shape) != (length,):
        raise ValueError(f"gain must have shape ({length},), got {tuple(gain.shape)}")
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
    integ = None if jacobi is None else ~jacobi  # the integrating features (None: all)
    P = window if 0 < window < L else L
    z_prev = z0.to(solve_dtype)
    B = z_prev.shape[0]
    bound = clamp_factor * float(host_values(z_prev.abs().amax())) if z_prev.numel() else 0.0
    Z = torch.empty((L, *z_prev.shape), dtype=solve_dtype, device=z0.device)
    # Scalar Newton is Anderson-mixed only when asked for (accel="anderson"): mixing it cost rounds on the fixture.
    scalar_accel = "picard" if accel == "auto" else accel
    if jacobian == "auto":  # the candidates: Picard / Anderson as `accel` says, and scalar Newton
        specs = [(accel, "identity"), (scalar_accel, "scalar")]
    else:
        specs = [(scalar_accel if jacobian == "scalar" else accel, jacobian)]
    lanes = [_new_lane(a, j, _guess(z_prev, P), L, gain, integ) for a, j in specs]
    stats.candidates = [f"{j}/{a}" for a, j in specs]
    s, best, best_level, since_best, restarts = 0, math.inf, math.inf, 0, 0
    twins = True  # the candidates' guesses are the same (evaluated once)
    while s < L:
        n = min(P, L - s)
        for lane in lanes:
            lane.Zw = lane.Zw[:n]
        Zprevs = [torch.cat([z_prev.unsqueeze(0), lane.Zw[:-1]], dim=0) for lane in lanes]
        if len(lanes) == 1 or twins:  # one candidate, or all still at the same guesses (the first round)
            Fs = [evaluate(s, Zprevs[0]).to(solve_dtype)] * len(lanes)
            stats.step_evaluations += n
        else:  # one batched call over both candidates' rows
            Fs = list(evaluate(s, torch.cat(Zprevs, dim=1)).to(solve_dtype).split(B, dim=1))
            stats.step_evaluations += n * len(lanes)
        stats.evaluations += 1
        gs, rhos = [], []
        for lane, Zprev, F in zip(lanes, Zprevs, Fs):
            if lane.jacobian == "scalar":
                seenZ, seenF, seen = lane.seen
                _secant(lane.gains[s: s + n], Zprev, F, seenZ[s: s + n], seenF[s: s + n], seen[s: s + n], integ)
            g = F - lane.Zw
            gs.append(g)
            rhos.append(sigma_residuals(g, sigma[s: s + n], parts) if rule == "sigma" else step_residuals(g, F, parts))
        rho_all = host_values(torch.stack(rhos))  # the round's one host read
        scored = []
        for rho in rho_all:
            p = _prefix(rho, tol)
            res = max(rho[p:], default=0.0)
            # progress: the mean log residual of the unaccepted steps (the max is not monotone under Picard: the
            # suffix's residuals grow while the front converges)
            level = _mean_log(rho[p:]) if math.isfinite(res) else math.inf
            scored.append((p, res, level))
        w = min(range(len(lanes)), key=lambda i: (-scored[i][0], scored[i][2]))  # the leading candidate
        if len(lanes) > 1:  # the race's measure: each candidate's mean log step residual over the whole window
            for lane, r in zip(lanes, rho_all):
                lane.levels.append(_mean_log(r))
        p, res, level = scored[w]
        rho = rho_all[w]
        stats.residuals.append(max(rho, default=0.0))
        stats.residual = stats.residuals[-1]
        if p == n:  # the whole window is accepted
            Z[s: s + n] = lanes[w].Zw
            s, z_prev = s + n, lanes[w].Zw[-1]
            for lane in lanes:
                lane.Zw = _guess(z_prev, min(P, L - s))
                lane.forget()
            twins = True
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
        # Commit the leader's accepted prefix and the exact step after it.
        q = p + 1
        Z[s: s + p] = lanes[w].Zw[:p]
        Z[s + p] = Fs[w][p]
        z_prev = Fs[w][p]
        bound = max(bound, clamp_factor * float(host_values(z_prev.abs().amax())))  # same read as rho's
        if stats.reason:
            s += q
            break
        stats.iterations += 1
        restart = restarts and since_best >= 2 and res > DIVERGED * best
        if restart:
            best, best_level, since_best = math.inf, math.inf, 0
        rests, twins = [], bool(restart)
        for lane, g in zip(lanes, gs):
            if restart:  # a fresh guess after the prefix
                lane.forget()
                rests.append(_guess(z_prev, n - q))
                continue
            g[:p] = 0  # the committed prefix; row p: the move to the committed (exact) step, all rows after it
            g[p] = z_prev - lane.Zw[p]  # follow it (for the leader this is its own defect there)
            rests.append(_update(lane, g, s, n, q, res, history, jacobi))
        s += q
        if len(lanes) > 1 and stats.iterations >= RACE_ROUNDS:  # the race is over
            keep = _race_winner(lanes)
            stats.chosen = stats.candidates[keep]
            log.debug("sampler solve: jacobian='auto' keeps %s after %d rounds (mean log residuals %s)",
                      stats.chosen, stats.iterations, [lane.levels[-RACE_WINDOW:] for lane in lanes])
            lanes, rests = [lanes[keep]], [rests[keep]]
        # The next window: the unaccepted rows, then guesses (the last state repeated) for the steps it gains.
        k = min(P, L - s)
        for lane, rest in zip(lanes, rests):
            if bound > 0:
                rest = rest.clamp(-bound, bound)
            lane.Zw = torch.cat([rest[: k], _guess(z_prev, max(k - rest.shape[0], 0))], dim=0)
            if lane.last is not None and k != rest.shape[0]:
                lane.forget()  # histories cover the old rows only; the window moved onto new steps
        if on_round:
            on_round(s, L)
    if not stats.chosen:  # one candidate, or a race that ended with the solve: the last round's leader
        stats.chosen = stats.candidates[_race_winner(lanes) if len(lanes) > 1 else 0]
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
