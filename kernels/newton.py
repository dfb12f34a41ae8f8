"""Newton (and quasi-Newton) solves of a chain `z_l = f_l(z_{l-1})`, and of its adjoint, by linear recurrences.

The chain is given as callables over *packed* states: the trajectory is one tensor `Z` of shape
`(L, B, w)` (L steps, B independent rows, w features; see ``pcr_compile.solve`` for the packing).

Forward (DeepPCR, Danieli et al. 2023, Sec. 3): with `Zprev = [z_0, z_1 .. z_{L-1}]` at the current
guess, one batched call gives `F_l = f_l(Zprev_l)` and an approximation `A_l` of `df_l/dz`; the next
guess solves the linear recurrence `z_l = A_l z_{l-1} + (F_l - A_l Zprev_l)` (with `z_0` given) by PCR,
in update form (`d_l = A_l d_{l-1} - r_l` for `d = Z_next - Z`, residual `r = Z - F`) so that rounding
scales with the residual rather than with the state.
`A` is the exact Jacobian ("dense": Newton), its diagonal ("diagonal": quasi-Newton, as quasi-DEER),
the identity ("identity": Picard, as ParaDiGMS) or zero ("zero": Jacobi). All share the fixed point, the
sequential result, and all are exact after at most L iterations (iteration k fixes step k at least).

Stopping: `max_l |z_l - F_l| / scale_l <= tol` (scale_l = max |F_l|, per step). On non-finite residuals, divergence or
`max_iters`, the solve finishes sequentially from the converged prefix, so the answer is always within
the tolerance of sequential evaluation.

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

from . import linear_recurrence

log = logging.getLogger(__name__)

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TINY = 1e-30


def default_tol(dtype: torch.dtype) -> float:
    return DEFAULT_TOL.get(dtype, 1e-5)


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


def _solve(A: torch.Tensor | None, b: torch.Tensor, structure: str, reverse: bool) -> torch.Tensor:
    if structure == "zero":
        return b.clone()
    return linear_recurrence(A if structure != "identity" else None, b, structure=structure, reverse=reverse)


def _relative_residual(r: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-step residual relative to that step's scale, max |F_l| (floored at 1e-3 of the chain's scale so
    that a step whose state is near zero is not held to an absolute zero)."""
    if r.numel() == 0:
        return torch.zeros(r.shape[0]), 0.0
    scale = F.abs().flatten(1).amax(1)
    floor = max(float(scale.max()) * 1e-3, TINY) if bool(torch.isfinite(scale).all()) else TINY
    rel = r.abs().flatten(1).amax(1) / scale.clamp_min(floor)
    return rel, float(rel.max())


def _converged_prefix(res_per_step: torch.Tensor, tol: float) -> int:
    """Number of leading steps whose (relative) residual is finite and within tol."""
    bad = ~(res_per_step <= tol)  # NaN counts as bad
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else res_per_step.shape[0]


def newton_forward(
    z0: torch.Tensor,
    length: int,
    evaluate: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]],
    step: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    structure: str,
    tol: float,
    max_iters: int,
    solve_dtype: torch.dtype,
    round_dtype: torch.dtype | None = None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolveStats]:
    """Solve the chain from packed `z0` (B, w); returns the packed trajectory `(L, B, w)` = [z_1..z_L].

    `evaluate(Zprev, need_A)` returns `(F, A)` for all steps at once (A None unless `need_A` and the
    structure needs it); `step(l, z)` evaluates step l alone (the sequential fallback). Linear algebra runs
    in `solve_dtype`; `round_dtype` (the chain's own half dtype) rounds each iterate to what the chain can
    represent, so the fixed point is the sequential half-precision result.
    """
    stats = SolveStats()
    L = length
    z0s = z0.to(solve_dtype)
    Z = init.to(solve_dtype) if init is not None else z0s.unsqueeze(0).expand(L, *z0s.shape).clone()
    best = math.inf
    while True:
        Zprev = torch.cat([z0s.unsqueeze(0), Z[:-1]], dim=0)
        need_A = structure in ("dense", "diagonal") and stats.iterations < max_iters
        F, A = evaluate(Zprev, need_A)
        F = F.to(solve_dtype)
        res_steps, res = _relative_residual(Z - F, F)  # (L,), max over steps
        stats.residuals.append(res)
        stats.residual = res
        stats.prefix = _converged_prefix(res_steps, tol)
        if res <= tol:
            stats.converged = True
            return Z, stats
        if not math.isfinite(res):
            stats.reason = "non-finite residual"
            break
        if stats.iterations >= max_iters:
            stats.reason = f"max_iters={max_iters} reached"
            break
        if res > 1e4 * best and stats.iterations >= 2:
            stats.reason = "diverging"
            break
        best = min(best, res)
        # Next guess z_l = F_l + A_l (z_{l-1} - Zprev_l), solved for the update d = Z_next - Z, which keeps
        # rounding proportional to the residual, not to the state: d_l = A_l d_{l-1} - r_l, d_{-1} = 0.
        A = None if A is None else A.to(solve_dtype)
        r = Z - F
        p = stats.prefix
        r[:p] = 0  # Newton fixes at least one more leading step per iteration: keep the converged prefix.
        Z = Z - _solve(A, r, structure, reverse=False)
        if round_dtype is not None:
            Z = Z.to(round_dtype).to(solve_dtype)
        stats.iterations += 1
    # Fallback: sequential from the converged prefix (exact, like eager).
    stats.fell_back = True
    log.debug("Newton solve fell back after %d iterations (%s); prefix %d of %d", stats.iterations,
              stats.reason, stats.prefix, L)
    return sequential_from(z0s, Z, stats.prefix, step, solve_dtype), stats


def sequential_from(z0: torch.Tensor, Z: torch.Tensor, prefix: int, step, solve_dtype) -> torch.Tensor:
    """Keep Z[:prefix] and evaluate the remaining steps one by one."""
    Z = Z.clone()
    prev = z0 if prefix == 0 else Z[prefix - 1]
    for l in range(prefix, Z.shape[0]):
        prev = step(l, prev).to(solve_dtype)
        Z[l] = prev
    return Z


def adjoint_solve(
    cot: torch.Tensor,
    vjp: Callable[[torch.Tensor], torch.Tensor],
    A: torch.Tensor | None,
    step_vjp: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    structure: str,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, SolveStats]:
    """Solve `lam_m = J_{m+1}^T lam_{m+1} + cot_m` (m = L-1..0, lam_L = 0) for packed `lam` (L, B, w).

    `vjp(lam)` returns `U` with `U[s] = J_s^T lam[s]` for every step s (one batched VJP; the exact
    operator); `A` approximates `J` in `structure` form (None for identity / zero); `step_vjp(s, v)`
    returns `J_s^T v` for one step (the sequential fallback).
    """
    stats = SolveStats()
    L = cot.shape[0]
    lam = _solve(A, cot, structure, reverse=True)
    while True:
        U = vjp(lam)
        # residual r_m = cot_m + U_{m+1} - lam_m  (U_L = 0)
        r = cot - lam
        r[:-1] += U[1:]
        _, res = _relative_residual(r, lam)
        stats.residuals.append(res)
        stats.residual = res
        if res <= tol:
            stats.converged = True
            return lam, stats
        if not math.isfinite(res):
            stats.reason = "non-finite residual"
            break
        if stats.iterations >= max_iters:
            stats.reason = f"max_iters={max_iters} reached"
            break
        lam = lam + _solve(A, r, structure, reverse=True)
        stats.iterations += 1
    stats.fell_back = True
    lam = torch.empty_like(cot)
    lam[L - 1] = cot[L - 1]
    for m in range(L - 2, -1, -1):
        lam[m] = step_vjp(m + 1, lam[m + 1]).to(lam.dtype) + cot[m]
    return lam, stats
