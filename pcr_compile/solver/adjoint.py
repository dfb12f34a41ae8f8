"""The adjoint of one chain op call (its AOTAutograd backward): one refinement over all steps at once, preconditioned
by the Jacobian strategy of the forward and made exact by vector-Jacobian products; step by step where the template
cannot be batched. Each per-step input's gradient comes out of one batched VJP, stacked ``(L, ...)``."""

from __future__ import annotations

import logging
import time

import torch
from torch.func import vjp

from pcr_compile.runtime.records import emit_solve

from . import auto_switch, newton, routes
from .call import ChainCall, ChainSpec, _functorch_ready
from .residual import all_finite

log = logging.getLogger(__name__)


def run_backward(spec: ChainSpec, trajs, states, stacked, consts, invariants, grads, length: int, tol: float,
                 max_iters: int, jacobian: str, impl: str = "auto", syms=(), traj_grads=(), needs_grad=None,
                 adaptive: bool = False):
    """Adjoint of the chain at the converged trajectory.

    `grads` are the cotangents of the final states; `traj_grads` (optional, `(L, *state)` each) those of
    every step's states, added to the adjoint's right-hand side step by step. `needs_grad` (optional, one
    bool per stacked group then per invariant) says which inputs gradients are wanted for.
    Returns gradients for (states, stacked groups `(L, ...)` each, invariants); None where an input is not
    floating or no gradient is wanted. No per-step copies: each group's gradient comes out of one
    batched vector-Jacobian product.
    """
    with _functorch_ready():
        return _run_backward(spec, trajs, states, stacked, consts, invariants, grads, length, tol, max_iters,
                             jacobian, impl, syms, traj_grads, needs_grad, adaptive)


def _substituted(call: ChainCall, diff_stacked: list[int], diff_inv: list[int], params) -> tuple[list, list]:
    """The call's (stacked per-step inputs, invariants) with the differentiable ones replaced by `params`
    (stacked first, then invariants), so that a VJP can differentiate with respect to them."""
    stacked, inv = list(call.stacked), list(call.invariants)
    for i, p in zip(diff_stacked, params[: len(diff_stacked)]):
        stacked[i] = p
    for i, p in zip(diff_inv, params[len(diff_stacked):]):
        inv[i] = p
    return stacked, inv


def _sequential_adjoint(call: ChainCall, Zprev: torch.Tensor, cot: torch.Tensor, diff_stacked: list[int],
                        diff_inv: list[int]) -> tuple:
    """The adjoint by one VJP per step, last step first, without vmap: the pullback's output layout
    (d Zprev with d z_0 at [0], *d stacked per-step inputs, *d invariants)."""
    L = call.L
    nd = len(diff_stacked)

    def step_with(l: int, z: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """`call.step(l, z)` as a function of step l's per-step inputs and the invariants too."""
        rows = [p.expand(L, *p.shape) for p in params[:nd]]  # views whose every row is p: step l reads p
        return call.step(l, z, *_substituted(call, diff_stacked, diff_inv, [*rows, *params[nd:]]))

    d_stacked = [torch.zeros_like(call.stacked[i]) for i in diff_stacked]
    d_inv = [torch.zeros_like(call.invariants[i]) for i in diff_inv]
    lam = torch.zeros_like(cot[0])
    for l in reversed(range(L)):
        lam = lam + cot[l]
        params = [call.stacked[i][l] for i in diff_stacked] + [call.invariants[i] for i in diff_inv]
        _, pb = vjp(lambda z, *ps, l=l: step_with(l, z, *ps), Zprev[l], *params)
        grads = pb(lam)
        lam = grads[0]
        for k in range(nd):
            d_stacked[k][l] = grads[1 + k]
        for k, g in enumerate(grads[1 + nd:]):
            d_inv[k] += g
    dZ = torch.zeros_like(Zprev)
    dZ[0] = lam
    return (dZ, *d_stacked, *d_inv)


def _run_backward(spec, trajs, states, stacked, consts, invariants, grads, length, tol, max_iters, jacobian, impl,
                  syms, traj_grads=(), needs_grad=None, adaptive=False):
    t0 = time.perf_counter()
    call = ChainCall(spec, states, stacked, consts, invariants, length, syms)
    lay = call.layout
    sd = call.solve_dtype
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype, spec.compute_dtype)
    z0 = lay.pack(call.states, lead=0, dtype=sd)
    Z = lay.pack(list(trajs), lead=1, dtype=sd)
    Zprev = torch.cat([z0.unsqueeze(0), Z[:-1]], dim=0)
    grads = [torch.zeros_like(s) if g is None else g for s, g in zip(call.states, grads)]
    cot = torch.zeros_like(Z)
    cot[-1] = lay.pack(grads, lead=0, dtype=sd)
    if len(traj_grads):
        cot += lay.pack(list(traj_grads), lead=1, dtype=sd)

    k = len(call.stacked)
    wanted = list(needs_grad) if needs_grad is not None and len(needs_grad) else [True] * (k + len(invariants))
    diff_stacked = [i for i, s in enumerate(call.stacked) if s.is_floating_point() and wanted[i]]
    diff_inv = [i for i, s in enumerate(call.invariants) if s.is_floating_point() and wanted[k + i]]

    def full_map(Zp, *params):
        return call.batched(Zp, *_substituted(call, diff_stacked, diff_inv, params))

    primals = [Zprev, *(call.stacked[i] for i in diff_stacked), *(call.invariants[i] for i in diff_inv)]
    # The approximate Jacobian only preconditions the refinement; the exact VJPs make the answer exact.
    structure = call.structure_for(jacobian if jacobian in ("dense", "diagonal", "identity", "zero") else "identity")
    for name, route in routes.BACKWARD:  # layer-parallel, say
        over = route(spec, call, Zprev, Z, cot, diff_stacked, diff_inv, tol, max_iters)
        if over is not None:
            emit_solve(spec.name, length, "backward", name, over[1], time.perf_counter() - t0)
            return _gradients(call, over[0], diff_stacked, diff_inv)
    learned = auto_switch.learned(spec, "backward", call.states) if adaptive else None
    if learned:
        out = _sequential_adjoint(call, Zprev, cot, diff_stacked, diff_inv)
        stats = newton.SolveStats(converged=True, reason=learned, sequential_steps=length)
        structure = "sequential"
    else:
        out, stats, structure = _parallel_adjoint(spec, call, Zprev, Z, cot, full_map, primals, diff_stacked,
                                                  diff_inv, structure, tol, max_iters, impl, lay.sizes, length)
    emit_solve(spec.name, length, "backward", structure, stats, time.perf_counter() - t0)
    if adaptive and not learned:
        auto_switch.learn(spec, "backward", call.states, length, stats)
    return _gradients(call, out, diff_stacked, diff_inv)


def _parallel_adjoint(spec, call, Zprev, Z, cot, full_map, primals, diff_stacked, diff_inv, structure, tol,
                      max_iters, impl, parts, length):
    """The adjoint by refinement over all steps at once (or step by step where the template cannot be
    batched): (the pullback's outputs, stats, the strategy that ran)."""
    try:
        if not all_finite([Z, cot]):
            return _nonfinite_adjoint(call, Zprev, cot, diff_stacked, diff_inv, length, structure,
                                      "trajectory or cotangent")
        _, pullback = vjp(full_map, *primals)
        last: dict = {}

        def apply_vjp(lam: torch.Tensor) -> torch.Tensor:
            out = pullback(lam)
            last["lam"], last["out"] = lam, out
            return out[0]

        A = call.approx_jacobian(Zprev, structure)
        if A is None and structure in ("dense", "diagonal"):
            structure = "identity"

        def step_vjp(s: int, v: torch.Tensor) -> torch.Tensor:
            stacked = call.stacked
            _, pb = vjp(lambda z: call.step(s, z, stacked), Zprev[s])
            return pb(v)[0]

        with torch.no_grad():
            lam, stats = newton.adjoint_solve(cot, apply_vjp, A, step_vjp, structure=structure, tol=tol,
                                              max_iters=max_iters, impl=impl, parts=parts)
            # (a converged adjoint is finite: a step with NaN or inf in it has a NaN residual)
            if stats.fell_back and not all_finite([lam]):
                return _nonfinite_adjoint(call, Zprev, cot, diff_stacked, diff_inv, length, structure, "adjoint")
            out = last["out"] if last.get("lam") is lam else pullback(lam)
    except Exception as e:  # a template that cannot be batched, say: the exact adjoint step by step instead
        log.warning("deeppcr: parallel adjoint of %s failed (%s: %s); evaluating sequentially",
                    spec.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        out = _sequential_adjoint(call, Zprev, cot, diff_stacked, diff_inv)
        stats = newton.SolveStats(fell_back=True, reason=f"{type(e).__name__}: {e}", sequential_steps=length)
    return out, stats, structure


def _nonfinite_adjoint(call, Zprev, cot, diff_stacked, diff_inv, length, structure, what):
    """The exact adjoint step by step, for a trajectory, cotangent or adjoint with NaN or inf in it: the batched
    pullback re-evaluates the steps with batched kernels, whose summation order can overflow where eager's did not
    (or not where it did), turning eager's NaN gradients into zeros; each step's own VJP runs eager's kernels, so
    the gradients have eager's NaN / inf pattern."""
    out = _sequential_adjoint(call, Zprev, cot, diff_stacked, diff_inv)
    stats = newton.SolveStats(fell_back=True, reason=f"non-finite {what}", sequential_steps=length)
    return out, stats, structure


def _gradients(call: ChainCall, out, diff_stacked: list[int], diff_inv: list[int]):
    """(d states, d stacked groups, d invariants) from the pullback's outputs; None where none is wanted."""
    lay = call.layout
    d_states = lay.unpack(out[0][0], lead=0)
    d_stacked = [None] * len(call.stacked)
    for i, g in zip(diff_stacked, out[1: 1 + len(diff_stacked)]):
        d_stacked[i] = g.to(call.stacked[i].dtype)
    d_inv = [None] * len(call.invariants)
    for i, g in zip(diff_inv, out[1 + len(diff_stacked):]):
        d_inv[i] = g.to(call.invariants[i].dtype)
    return d_states, d_stacked, d_inv
