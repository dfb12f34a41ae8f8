"""The forward solve of one chain op call: the fused kernels where they apply, else the general Newton / quasi-Newton
/ Picard driver (``newton.py``), else (a template that cannot be batched, non-finite input) sequential evaluation."""

from __future__ import annotations

import logging
import time

import torch

from pcr_compile.runtime.records import emit_solve

from . import auto_switch, fused, newton, routes, sampler
from .call import ChainCall, ChainSpec, _functorch_ready
from .residual import all_finite

log = logging.getLogger(__name__)


def run_forward(spec: ChainSpec, states, stacked, consts, invariants, length: int, tol: float, max_iters: int,
                jacobian: str, window: int = 0, keep_trajectory: bool = True, impl: str = "auto",
                syms=(), adaptive: bool = False, sampler_jacobian: str = "auto") -> list[torch.Tensor]:
    """Solve the chain; returns the trajectories `(L, *state_shape)`, one per state, in the states' dtypes
    (only the last step, `(1, *state_shape)`, when `keep_trajectory` is False). `adaptive` (mode="auto"):
    a solve that does not pay switches later calls with the same shapes to sequential evaluation.
    `sampler_jacobian`: the update of a sampler chain solved by the sampler solve (structure "identity", full
    window, float32 / float64): "auto" (scalar Newton and Picard + Anderson raced), "scalar" or "identity"."""
    if sampler_jacobian not in sampler.JACOBIANS:
        raise ValueError(f"sampler_jacobian must be one of {sampler.JACOBIANS}, got {sampler_jacobian!r}")
    with _functorch_ready():
        return _run_forward(spec, states, stacked, consts, invariants, length, tol, max_iters, jacobian, window,
                            keep_trajectory, impl, syms, adaptive, sampler_jacobian)


def _fused(call: ChainCall, z0: torch.Tensor, jacobian: str, tol: float, max_iters: int, window: int, impl: str):
    """The fused Newton kernels for linear-pointwise chains on the GPU; None where they do not apply."""
    lp = call.linear_pointwise
    if (lp is None or lp.activation is None or jacobian != "dense" or window or impl == "torch"
            or not (impl == "triton" or z0.is_cuda) or call.layout.w > fused.MAX_FUSED_W):
        return None
    W = call.stacked[lp.weight]
    b = None if lp.bias is None else call.stacked[lp.bias]
    res = fused.newton_linear_pointwise(z0, W, b, activation=lp.activation, residual=lp.residual, tol=tol,
                                               max_iters=max_iters, impl="triton")
    if not res.converged:
        return None  # the general solver takes over, with its prefix-preserving fallback
    stats = newton.SolveStats(iterations=res.iterations, residual=res.residual, converged=True, prefix=call.L,
                              residuals=list(res.residuals), reason="fused", evaluations=res.iterations + 1)
    return res.traj.to(call.solve_dtype), stats


def _sampler(call: ChainCall, z0: torch.Tensor, length: int, tol: float, max_iters: int, jacobian: str):
    """The sampler solve (sampler.py) over the template's batched steps, with update `jacobian`.

    jacobian="auto" races two candidates and hands both guesses over at once, side by side as rows
    `(n, 2B, w)`. They are evaluated as `2n` steps of the usual batched call (`ChainCall.batched`'s `copies`),
    not as `2B` rows: the traced template's batch size may be specialised, and its rows may interact (batch
    statistics), whereas the template is vmapped over steps, so the copies are independent by construction. A
    stacked call that fails (memory, say) is retried as one call per candidate from then on, and those calls
    are counted in `evaluations`; a failure of a single call is the caller's (a sequential answer)."""
    B = z0.shape[0]
    split = [False]  # evaluate the candidates one call each (the stacked call failed once)
    extra = [0]  # batched calls beyond one per round

    def evaluate(s: int, Zp: torch.Tensor) -> torch.Tensor:
        k = Zp.shape[1] // B  # candidates side by side
        if k == 1:
            return call.batched(Zp, start=s)
        parts = Zp.split(B, dim=1)
        if not split[0]:
            try:
                F = call.batched(torch.cat(parts), start=s, copies=k)  # (k n, B, w)
                return torch.cat(F.split(Zp.shape[0]), dim=1)
            except Exception as e:  # noqa: BLE001 - retried below one candidate at a time; that one may raise
                log.warning("deeppcr: %s: the race's stacked call failed (%s: %s); one call per candidate from now",
                            call.spec.name, type(e).__name__, e)
                split[0] = True
        extra[0] += k - 1
        return torch.cat([call.batched(p, start=s) for p in parts], dim=1)

    # accel's default: Anderson mixing for Picard, none for scalar Newton (as the race runs its candidates)
    Z, stats = sampler.sampler_forward(z0, length, evaluate, tol=tol, max_iters=min(max_iters, length),
                                       solve_dtype=call.solve_dtype, parts=call.layout.sizes, jacobian=jacobian,
                                       stacked_rows=True)
    stats.evaluations += extra[0]
    return Z, stats


def _run_forward(spec, states, stacked, consts, invariants, length, tol, max_iters, jacobian, window,
                 keep_trajectory, impl, syms, adaptive=False, sampler_jacobian="auto"):
    t0 = time.perf_counter()
    call = ChainCall(spec, states, stacked, consts, invariants, length, syms)
    lay = call.layout
    z0 = lay.pack(call.states, lead=0, dtype=call.solve_dtype)
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype, spec.compute_dtype)
    structure = call.structure_for(jacobian)
    for name, route in routes.FORWARD if jacobian != "sequential" else ():  # layer-parallel, say
        over = route(spec, call, z0, structure, tol, max_iters)
        if over is not None:
            emit_solve(spec.name, length, "forward", name, over[1], time.perf_counter() - t0)
            return lay.unpack(over[0] if keep_trajectory else over[0][-1:], lead=1)
    learned = auto_switch.learned(spec, "forward", call.states) if adaptive else None
    if learned:
        Z = call.sequential(z0, keep_trajectory)
        stats = newton.SolveStats(converged=True, sequential_steps=length, reason=learned)
        emit_solve(spec.name, length, "forward", "sequential", stats, time.perf_counter() - t0)
        return lay.unpack(Z, lead=1)
    if jacobian == "sequential" or not all_finite([z0]):
        # Non-finite input data: eager's NaN/inf pattern is only reproduced by evaluating in order.
        Z, stats = call.sequential(z0, keep_trajectory), newton.SolveStats(
            fell_back=jacobian != "sequential", converged=jacobian == "sequential", sequential_steps=length,
            reason="non-finite input state" if jacobian != "sequential" else "")
    else:
        try:
            with torch.no_grad():
                fused = _fused(call, z0, structure, tol, max_iters, window, impl)
                if fused is not None:
                    Z, stats = fused
                    Z = Z if keep_trajectory else Z[-1:]
                elif spec.kind == "sampler" and structure == "identity" and not window and call.round_dtype is None:
                    # Matrix-free samplers: the never-deeper-than-sequential sampler solve (sampler.py)
                    Z, stats = _sampler(call, z0, length, tol, max_iters, sampler_jacobian)
                    Z = Z if keep_trajectory else Z[-1:]
                else:
                    Z, stats = newton.newton_forward(
                        z0, length, lambda s, Zp, need: call.evaluate(s, Zp, need, structure), call.step,
                        structure=structure, tol=tol, max_iters=max_iters, solve_dtype=call.solve_dtype,
                        round_dtype=call.round_dtype, window=window, keep_trajectory=keep_trajectory, impl=impl,
                        parts=lay.sizes)
        except Exception as e:  # a template that cannot be batched, say: exact sequential answer instead
            log.warning("deeppcr: parallel solve of %s failed (%s: %s); evaluating sequentially",
                        spec.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            stats = newton.SolveStats(fell_back=True, reason=f"{type(e).__name__}: {e}", sequential_steps=length)
            Z = call.sequential(z0, keep_trajectory)
    emit_solve(spec.name, length, "forward", structure, stats, time.perf_counter() - t0)
    if adaptive:
        auto_switch.learn(spec, "forward", call.states, length, stats)
    return lay.unpack(Z, lead=1)
