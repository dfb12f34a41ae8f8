"""Newton (and quasi-Newton) solves of a chain `z_l = f_l(z_{l-1})`, and of its adjoint, by linear recurrences.

The chain is given as callables over *packed* states: the trajectory is one tensor `Z` of shape
`(L, B, w)` (L steps, B independent rows, w features; see ``call.py`` for the packing).

Forward (DeepPCR, Danieli et al. 2023, Sec. 3): with `Zprev = [z_0, z_1 .. z_{L-1}]` at the current
guess, one batched call gives `F_l = f_l(Zprev_l)` and an approximation `A_l` of `df_l/dz`; the next
guess solves the linear recurrence `z_l = A_l z_{l-1} + (F_l - A_l Zprev_l)` (with `z_0` given) by PCR,
in update form (`d_l = A_l d_{l-1} - r_l` for `d = Z_next - Z`, residual `r = Z - F`) so that rounding
scales with the residual rather than with the state.
`A` is the exact Jacobian ("dense": Newton), its diagonal ("diagonal": quasi-Newton, as quasi-DEER),
the identity ("identity": Picard, as ParaDiGMS) or zero ("zero": Jacobi). All share the fixed point, the
sequential result, and all are exact after at most L iterations (iteration k fixes step k at least).

Stopping (one rule for both directions and every path, defined and derived in ``residual.py``): step l
is accepted when `max_b max_i |z_{l,b,i} - F_{l,b,i}| / max_i |F_{l,b,i}| <= tol`, each row measured against
its own size at that step; the result is then the exact trajectory of the chain with every step
perturbed by at most `tol` of its own size, and its error against sequential evaluation is those
perturbations propagated through the Jacobian products, as eager's own rounding errors are. On
non-finite residuals, divergence or `max_iters`, the solve finishes sequentially from the accepted
(verified) prefix. Each iteration reads its residuals from the device once.

Adjoint: `lam_{L-1} = c_{L-1}`, `lam_m = J_{m+1}^T lam_{m+1} + c_m`, solved by iterative refinement: a
reverse linear recurrence on the approximate `A^T`, corrected with exact batched vector-Jacobian products
until the residual is under the tolerance (one correction check when `A` is the exact Jacobian).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pcr_compile.kernels import linear_recurrence

from .residual import host_values, step_residuals

log = logging.getLogger(__name__)

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# Steps that compute in a lower precision than their state (a float32 state under torch.autocast): the
# residual of an exact solve is then as large as the casts' rounding, which batched evaluation does not
# reproduce bit for bit, so a float32 tolerance is met only by chance (Newton creeps one step per iteration).
# Half the compute dtype's unit roundoff bounds the solve's error by about half of eager's own rounding
# (residual.py). Measured on 64-step residual MLPs (x + s tanh(W x + b), autocast to the dtype on CPU):
# bfloat16, s = 0.3: 3 Newton iterations, 3.3e-3 error against float32 math, eager's autocast 3.0e-3
# (float32's 1e-6: 39 iterations); s = 1: 12 iterations, 1.5e-2 (eager 1.6e-2; 1e-6: 48). RESULTS.md.
AUTOCAST_TOL = {dt: torch.finfo(dt).eps / 4 for dt in (torch.bfloat16, torch.float16)}


def default_tol(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> float:
    """The default tolerance of a state of `dtype` whose steps compute in `compute_dtype` (torch.autocast's
    dtype; None outside autocast): the looser of the two dtypes' tolerances."""
    tol = DEFAULT_TOL.get(dtype, 1e-5)
    return max(tol, AUTOCAST_TOL.get(compute_dtype, 0.0)) if compute_dtype is not None else tol


@dataclass
class SolveStats:
    """What one solve did; turned into a public ``SolveRecord`` by the caller."""

    iterations: int = 0
    residual: float = math.inf
    converged: bool = False
    fell_back: bool = False
    prefix: int = 0  # leading steps that had converged when the solve stopped
    residuals: list[float] = field(default_factory=list)
    reason: str = ""
    evaluations: int = 0  # batched evaluations of all (window) steps; the last one certifies the result
    sequential_steps: int = 0  # steps evaluated one at a time (the fallback)


def _solve(A: torch.Tensor | None, b: torch.Tensor, structure: str, reverse: bool, impl: str) -> torch.Tensor:
    if structure == "zero":
        return b.clone()
    return linear_recurrence(A if structure != "identity" else None, b, structure=structure, reverse=reverse,
                             impl=impl)


def _prefix(rho: list[float], tol: float) -> int:
    """Leading steps whose step residual is within tol (NaN and inf are not)."""
    for i, x in enumerate(rho):
        if not x <= tol:
            return i
    return len(rho)


def newton_forward(
    z0: torch.Tensor,
    length: int,
    evaluate: Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]],
    step: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    structure: str,
    tol: float,
    max_iters: int,
    solve_dtype: torch.dtype,
    round_dtype: torch.dtype | None = None,
    window: int = 0,
    keep_trajectory: bool = True,
    impl: str = "auto",
    parts: list[int] | None = None,
) -> tuple[torch.Tensor, SolveStats]:
    """Solve the chain from packed `z0` (B, w).

    Returns the packed trajectory `(L, B, w)` = [z_1..z_L], or only `z_L` as `(1, B, w)` when
    `keep_trajectory` is False (then memory stays O(window x state)).

    `evaluate(start, Zprev, need_A)` returns `(F, A)` for steps `start .. start + len(Zprev)` in one batched
    call (A None unless `need_A`); `step(l, z)` evaluates step l alone (the sequential fallback). Linear
    algebra runs in `solve_dtype`; `round_dtype` (the chain's own half dtype) rounds each iterate to what
    the chain can represent, so the fixed point is the sequential half-precision result.

    Sliding window (ParaDiGMS, Shih et al. 2023): only `window` steps (0: all) are iterated at a time;
    converged leading steps are committed and the window moves past them. Newton (and Picard) fix at least
    the first unconverged step per update, so every update makes progress. `max_iters` bounds the updates
    per window length of progress. `impl` selects the linear-recurrence kernels (see `linear_recurrence`).
    `parts` splits the packed features into the carried tensors, each measured against its own size.

    Stopping and acceptance (``residual.py``, with the derivation): step l is accepted when its
    step residual `rho_l <= tol`; only accepted leading steps are committed, and the sequential fallback
    starts from the last committed one, so a fallback never continues from a wrong state.
    """
    stats = SolveStats()
    L = length
    P = window if 0 < window < L else L
    budget = max_iters * -(-L // P)
    z_prev = z0.to(solve_dtype)  # the state before the window (exact)
    Zw = z_prev.unsqueeze(0).expand(P, *z_prev.shape).clone()  # guesses for steps s .. s+P-1
    Z = torch.empty((L, *z_prev.shape), dtype=solve_dtype, device=z0.device) if keep_trajectory else None
    s = 0  # first step not yet committed
    best, since_advance = math.inf, 0
    while s < L:
        n = min(P, L - s)
        Zw = Zw[:n]
        Zprev = torch.cat([z_prev.unsqueeze(0), Zw[:-1]], dim=0)
        need_A = structure in ("dense", "diagonal") and stats.iterations < budget
        F, A = evaluate(s, Zprev, need_A)
        stats.evaluations += 1
        F = F.to(solve_dtype)
        r = Zw - F
        rho = host_values(step_residuals(r, F, parts))  # the iteration's one host read
        res = max(rho) if rho else 0.0
        stats.residuals.append(res)
        stats.residual = res
        p = _prefix(rho, tol)
        if p < n:
            if not math.isfinite(res):
                stats.reason = "non-finite residual"
            elif stats.iterations >= budget:
                stats.reason = f"max_iters={max_iters} reached"
            elif res > 1e4 * best and since_advance >= 2:
                stats.reason = "diverging"
            elif since_advance >= max(max_iters, 1):
                stats.reason = f"no progress in {since_advance} iterations"
            elif stats.iterations >= 8 and s + p < stats.iterations:
                stats.reason = "no faster than sequential"
            if not stats.reason:
                best = min(best, res)
                # Next guess z_l = F_l + A_l (z_{l-1} - Zprev_l), solved for the update d = Z_next - Z, which
                # keeps rounding proportional to the residual: d_l = A_l d_{l-1} - r_l, d_{-1} = 0.
                # The converged prefix stays as it is (r = 0 there).
                r[:p] = 0
                Zw = Zw - _solve(None if A is None else A.to(solve_dtype), r, structure, reverse=False, impl=impl)
                if round_dtype is not None:
                    Zw = Zw.to(round_dtype).to(solve_dtype)
                stats.iterations += 1
                since_advance += 1
        # Commit the converged prefix and move the window past it.
        if p:
            if Z is not None:
                Z[s: s + p] = Zw[:p]
            z_prev = Zw[p - 1]
            s += p
            Zw = torch.cat([Zw[p:], z_prev.unsqueeze(0).expand(p, *z_prev.shape)], dim=0)
            best, since_advance = math.inf, 0
        if stats.reason:
            break
    stats.prefix = s
    if s == L:
        stats.converged = True
        return (Z if Z is not None else z_prev.unsqueeze(0)), stats
    # Fallback: sequential from the committed prefix (exact, like eager).
    stats.fell_back = True
    log.debug("Newton solve fell back after %d iterations (%s); prefix %d of %d", stats.iterations,
              stats.reason, s, L)
    stats.sequential_steps = L - s
    for l in range(s, L):
        z_prev = step(l, z_prev).to(solve_dtype)
        if Z is not None:
            Z[l] = z_prev
    return (Z if Z is not None else z_prev.unsqueeze(0)), stats


def adjoint_solve(
    cot: torch.Tensor,
    vjp: Callable[[torch.Tensor], torch.Tensor],
    A: torch.Tensor | None,
    step_vjp: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    structure: str,
    tol: float,
    max_iters: int,
    impl: str = "auto",
    parts: list[int] | None = None,
) -> tuple[torch.Tensor, SolveStats]:
    """Solve `lam_m = J_{m+1}^T lam_{m+1} + cot_m` (m = L-1..0, lam_L = 0) for packed `lam` (L, B, w).

    `vjp(lam)` returns `U` with `U[s] = J_s^T lam[s]` for every step s (one batched VJP; the exact
    operator); `A` approximates `J` in `structure` form (None for identity / zero); `step_vjp(s, v)`
    returns `J_s^T v` for one step (the sequential fallback).

    Stopping: the same step residual as the forward (``residual.py``), each step's residual against
    its evaluated right-hand side `cot_m + J_{m+1}^T lam_{m+1}`; the fallback continues from the verified
    trailing steps only.
    """
    stats = SolveStats()
    L = cot.shape[0]
    lam = _solve(A, cot, structure, reverse=True, impl=impl)
    done = 0  # trailing steps whose residual is within tol: kept as they are, like the forward's prefix
    while True:
        U = vjp(lam)
        stats.evaluations += 1
        # residual r_m = cot_m + U_{m+1} - lam_m  (U_L = 0)
        G = cot.clone()  # the evaluated right-hand side cot_m + J_{m+1}^T lam_{m+1}: the adjoint's "F"
        G[:-1] += U[1:]
        r = G - lam
        rho = host_values(step_residuals(r, G, parts))  # the iteration's one host read
        res = max(rho) if rho else 0.0
        stats.residuals.append(res)
        stats.residual = res
        done = _prefix(rho[::-1], tol)
        stats.prefix = done
        if done == L:
            stats.converged = True
            return lam, stats
        if not math.isfinite(res):
            stats.reason = "non-finite residual"
            break
        if stats.iterations >= max_iters:
            stats.reason = f"max_iters={max_iters} reached"
            break
        # The update solves the same adjoint recurrence for the correction; the first unconverged step from
        # the end becomes exact, so every iteration converges at least one more step.
        r[L - done:] = 0
        lam = lam + _solve(A, r, structure, reverse=True, impl=impl)
        stats.iterations += 1
    stats.fell_back = True
    lam = lam.clone()
    if not done:
        lam[L - 1] = cot[L - 1]
        done = 1
    stats.sequential_steps = L - done
    for m in range(L - 1 - done, -1, -1):  # sequentially, from the converged suffix
        lam[m] = step_vjp(m + 1, lam[m + 1]).to(lam.dtype) + cot[m]
    return lam, stats
