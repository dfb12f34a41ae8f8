"""Run-time side of a chain op: evaluate the block template over all steps and drive the solvers.

A chain is described by a :class:`ChainSpec` (made by the rewrite pass): an FX template of one step,
`template(*states, *stacked[l], *consts[l], *invariants) -> tuple(new_states)`, with

- states: the carried tensors, `(B, ...)` each;
- stacked: inputs that differ per step (layer parameters), one `(L, ...)` tensor per group, stacked in the
  rewritten graph (so that autograd differentiates the stack: each layer's gradient is a view of one
  stacked gradient) or passed as they are where the model already holds them stacked (`W[i]` reads);
- consts: per-step constants lifted out of the graph, already stacked `(L, ...)`;
- invariants: inputs shared by every step;
- syms: symbolic sizes shared by every step (ints at run time; dynamic shapes).

States are *packed* for the linear algebra: every state is flattened to `(B, w_i)` and concatenated
along features, `(B, w)`; when the states do not share a leading batch dim, the whole state is one row
`(1, w)`. Jacobians are per row: exact when rows do not interact (the usual batch semantics), an
approximation otherwise, which the residual checks of both solves catch (the answer stays exact).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch.func import vjp, vmap

from pcr_compile.kernels import fused_newton, newton
from pcr_compile.kernels.residual import host_values
from pcr_compile.passes.structure import LinearPointwise
from pcr_compile.records import SolveRecord, emit

# Dense Jacobians are materialised only up to this width when "diagonal" needs a generic diagonal.
DENSE_DIAGONAL_MAX_WIDTH = 64
# mode="auto": a solve that needed more than this fraction of the chain's steps in iterations (or fell back)
# switches its chain to sequential evaluation for later calls with the same shapes. On the launch-count
# model (benchmarks: a Newton / Picard iteration launches the block's ops once over all steps, plus the
# linear solve, the residual and its host read, about 10 launches and a sync more), an iteration of a
# small block (2-4 ops: a linear layer and an activation) costs what 3-6 sequential steps cost, and one of
# a transformer block (20+ ops) what 1.5 steps cost; above L/4 iterations the parallel solve cannot beat L
# sequential steps for the small blocks, and at most ~2.5x for the large ones, which is not worth its
# extra work. A chain that takes ~L iterations (12-layer transformer stacks under Picard, samplers on
# random-weight denoisers) is switched after its first call.
SWITCH_FRACTION = 0.25
_SWITCHED: dict[tuple, str] = {}  # (chain op, direction, shapes) -> why it runs sequentially now
_switch_lock = threading.Lock()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainSpec:
    """Everything the chain op needs besides its tensor inputs; registered under the op's name."""

    name: str
    template: torch.fx.GraphModule
    n_state: int
    n_per_step: int
    n_consts: int
    n_invariants: int
    n_syms: int = 0
    kind: str = "layers"
    lp: LinearPointwise | None = None  # set when one step is act(z W^T + b) (+ z): cheap exact diagonal


class Layout:
    """Packing of a list of state tensors into one `(..., B, w)` tensor and back."""

    def __init__(self, states: list[torch.Tensor]):
        self.shapes = [tuple(s.shape) for s in states]
        self.dtypes = [s.dtype for s in states]
        leading = {s[0] if len(s) >= 2 else None for s in self.shapes}
        self.batched = len(leading) == 1 and None not in leading
        self.B = self.shapes[0][0] if self.batched else 1
        self.sizes = [math.prod(s[1:]) if self.batched else math.prod(s) for s in self.shapes]
        self.w = sum(self.sizes)

    def pack(self, states: list[torch.Tensor], lead: int, dtype: torch.dtype) -> torch.Tensor:
        """states with `lead` leading dims (0 or 1) -> `(*lead, B, w)`."""
        flat = [s.reshape(*s.shape[:lead], self.B, n).to(dtype) for s, n in zip(states, self.sizes)]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def unpack(self, packed: torch.Tensor, lead: int) -> list[torch.Tensor]:
        parts = packed.split(self.sizes, dim=-1) if len(self.sizes) > 1 else [packed]
        lead_shape = packed.shape[:lead]
        return [p.reshape((*lead_shape, *shape)).to(dt).contiguous()
                for p, shape, dt in zip(parts, self.shapes, self.dtypes)]


class ChainCall:
    """One call of a chain op with its inputs: closures over the template for the solvers."""

    def __init__(self, spec: ChainSpec, states, stacked, consts, invariants, length: int, syms=()):
        self.spec = spec
        self.syms = list(syms)
        self.L = length
        k = spec.n_per_step
        self.stacked = list(stacked)  # k tensors (L, ...)
        self.consts = list(consts)
        self.invariants = list(invariants)
        self.states = list(states)
        self.layout = Layout(self.states)
        dtype = self.states[0].dtype
        self.solve_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.round_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        n_s, n_c, n_i = spec.n_state, spec.n_consts, spec.n_invariants
        self._in_dims = (0,) * (n_s + k + n_c) + (None,) * (n_i + len(self.syms))
        self._batched = vmap(self._call_template, in_dims=self._in_dims)

    def _call_template(self, *args):
        return tuple(self.spec.template(*args))

    # --- evaluation of all steps at once ---------------------------------------------------------
    def batched(self, Zprev: torch.Tensor, stacked=None, invariants=None, start: int = 0) -> torch.Tensor:
        """F = [f_l(Zprev_l)] for steps start .. start + len(Zprev), packed (n, B, w) in solve dtype."""
        stacked = self.stacked if stacked is None else stacked
        invariants = self.invariants if invariants is None else invariants
        n = Zprev.shape[0]
        if start or n != self.L:
            stacked = [t[start: start + n] for t in stacked]
            consts = [t[start: start + n] for t in self.consts]
        else:
            consts = self.consts
        prev = self.layout.unpack(Zprev, lead=1)
        out = self._batched(*prev, *stacked, *consts, *invariants, *self.syms)
        return self.layout.pack(list(out), lead=1, dtype=self.solve_dtype)

    @property
    def linear_pointwise(self) -> LinearPointwise | None:
        """The template's linear-pointwise structure, where the state is one `(B, w)` / `(w,)` tensor."""
        lp = self.spec.lp
        return lp if lp is not None and len(self.layout.shapes[0]) in (1, 2) else None

    def structure_for(self, jacobian: str) -> str:
        """The strategy that can run: "diagonal" needs a cheap exact diagonal or a small width."""
        if jacobian == "diagonal" and self.linear_pointwise is None and self.layout.w > DENSE_DIAGONAL_MAX_WIDTH:
            return "identity"
        return jacobian

    def evaluate(self, start: int, Zprev: torch.Tensor, need_A: bool, structure: str):
        """(F, A) for steps start .. start + len(Zprev); A in `structure` form (None unless need_A)."""
        if structure == "diagonal" and self.linear_pointwise is not None:
            return self._linear_pointwise(start, Zprev)
        if not need_A:
            with torch.no_grad():
                return self.batched(Zprev, start=start), None
        F, pullback = vjp(lambda Zp: self.batched(Zp, start=start), Zprev)
        J = self.jacobian_from(pullback, Zprev)
        if structure == "diagonal":
            J = J.diagonal(dim1=-2, dim2=-1)
        return F.detach(), J.detach()

    def _linear_pointwise(self, start: int, Zprev: torch.Tensor):
        """F and the exact diagonal of J for z -> act(z W^T + b) (+ z): diag(act'(a)) * diag(W) (+ 1)."""
        lp = self.linear_pointwise
        n = Zprev.shape[0]
        W = self.stacked[lp.weight][start: start + n]  # (n, w, w)
        z = Zprev.reshape(n, -1, W.shape[-1]).to(W.dtype)  # (n, B, w)
        a = torch.einsum("nbi,noi->nbo", z, W)
        if lp.bias is not None:
            a = a + self.stacked[lp.bias][start: start + n].unsqueeze(1)
        act, dact = torch.func.jvp(lp.pointwise, (a,), (torch.ones_like(a),))
        diag = dact * W.diagonal(dim1=-2, dim2=-1).unsqueeze(1)
        if lp.residual:
            act, diag = z + act, diag + 1
        sd = self.solve_dtype
        return act.reshape(Zprev.shape).to(sd), diag.reshape(Zprev.shape).to(sd)

    def approx_jacobian(self, Zprev: torch.Tensor, structure: str) -> torch.Tensor | None:
        """`A` in `structure` form at Zprev for all steps (None for identity / zero)."""
        if structure not in ("dense", "diagonal"):
            return None
        return self.evaluate(0, Zprev, True, structure)[1]

    def jacobian_from(self, pullback, Zprev: torch.Tensor) -> torch.Tensor:
        """Per-row Jacobian (L, B, w, w) from a pullback of the batched map: w batched VJPs."""
        w = self.layout.w
        eye = torch.eye(w, dtype=Zprev.dtype, device=Zprev.device)
        basis = eye.reshape(w, 1, 1, w).expand(w, *Zprev.shape)  # (w_out, L, B, w)
        (rows,) = vmap(pullback)(basis)  # (w_out, L, B, w_in)
        return rows.permute(1, 2, 0, 3)

    @torch.no_grad()
    def sequential(self, z0: torch.Tensor, keep_trajectory: bool) -> torch.Tensor:
        """All steps in order: the packed trajectory (L, B, w), or (1, B, w) holding z_L."""
        Z = z0.new_empty((self.L if keep_trajectory else 1, *z0.shape))
        z = z0
        for l in range(self.L):
            z = self.step(l, z)
            Z[l if keep_trajectory else 0] = z
        return Z

    def step(self, l: int, z: torch.Tensor, stacked=None, invariants=None) -> torch.Tensor:
        """One step alone on a packed state (B, w): the sequential path."""
        stacked = self.stacked if stacked is None else stacked
        invariants = self.invariants if invariants is None else invariants
        prev = self.layout.unpack(z, lead=0)
        args = [*prev, *(s[l] for s in stacked), *(c[l] for c in self.consts), *invariants, *self.syms]
        out = self.spec.template(*args)
        return self.layout.pack(list(out), lead=0, dtype=self.solve_dtype)


_CLEARED_KEYS = ("FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchBatched",
                 "FuncTorchVmapMode", "FuncTorchGradWrapper", "Batched", "VmapMode", "BatchedNestedTensor",
                 "ADInplaceOrView", "Functionalize", "PythonTLSSnapshot", "Conjugate", "Negative", "ZeroTensor",
                 "PreDispatch", "Tracer")


def _functorch_ready():
    """A dispatch-key guard under which torch.func transforms work inside the op.

    Compiled graphs call custom ops with most dispatch keys excluded (functorch's among them), which
    breaks `vmap`/`vjp` ("Cannot access storage of TensorWrapper"); re-allow those keys for the solve.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _CLEARED_KEYS:
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None and exclude.has(key):
            exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _record(spec: ChainSpec, L: int, direction: str, jacobian: str, stats: newton.SolveStats, t0: float) -> None:
    emit(SolveRecord(chain=spec.name, length=L, iterations=stats.iterations, residual=stats.residual,
                     converged=stats.converged, fell_back=stats.fell_back, direction=direction, jacobian=jacobian,
                     prefix=stats.prefix, residuals=tuple(stats.residuals), reason=stats.reason,
                     seconds=time.perf_counter() - t0, evaluations=stats.evaluations,
                     sequential_steps=stats.sequential_steps))


def _switch_key(spec: ChainSpec, direction: str, states) -> tuple:
    return (spec.name, direction, tuple((tuple(s.shape), s.dtype, s.device.type) for s in states))


def switched(name: str) -> list[str]:
    """Why chain op `name` runs sequentially now (mode="auto" learned it from a solve), one reason per
    direction and shape; [] when it was never switched."""
    with _switch_lock:
        return [why for (n, _, _), why in _SWITCHED.items() if n == name]


def _learn(spec: ChainSpec, direction: str, states, L: int, stats) -> None:
    """Remember a solve that did not pay (mode="auto"): its later calls with these shapes run sequentially."""
    if not (stats.fell_back or stats.iterations > SWITCH_FRACTION * L):
        return
    what = f"fell back ({stats.reason})" if stats.fell_back else f"took {stats.iterations} iterations"
    why = (f"auto: the first {direction} solve {what} for {L} steps (> {SWITCH_FRACTION:g} L iterations do not "
           "pay); sequential from then on for these shapes")
    with _switch_lock:
        _SWITCHED.setdefault(_switch_key(spec, direction, states), why)
    log.info("deeppcr: %s %s", spec.name, why)


def _all_finite(tensors) -> bool:
    """Whether every floating tensor is finite, in one host read."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not flags or bool(host_values(torch.stack(flags).all()))


def run_forward(spec: ChainSpec, states, stacked, consts, invariants, length: int, tol: float, max_iters: int,
                jacobian: str, window: int = 0, keep_trajectory: bool = True, impl: str = "auto",
                syms=(), adaptive: bool = False) -> list[torch.Tensor]:
    """Solve the chain; returns the trajectories `(L, *state_shape)`, one per state, in the states' dtypes
    (only the last step, `(1, *state_shape)`, when `keep_trajectory` is False). `adaptive` (mode="auto"):
    a solve that does not pay switches later calls with the same shapes to sequential evaluation."""
    with _functorch_ready():
        return _run_forward(spec, states, stacked, consts, invariants, length, tol, max_iters, jacobian, window,
                            keep_trajectory, impl, syms, adaptive)


def _fused(call: ChainCall, z0: torch.Tensor, jacobian: str, tol: float, max_iters: int, window: int, impl: str):
    """The fused Newton kernels for linear-pointwise chains on the GPU; None where they do not apply."""
    lp = call.linear_pointwise
    if (lp is None or lp.activation is None or jacobian != "dense" or window or impl == "torch"
            or not (impl == "triton" or z0.is_cuda) or call.layout.w > fused_newton.MAX_FUSED_W):
        return None
    W = call.stacked[lp.weight]
    b = None if lp.bias is None else call.stacked[lp.bias]
    res = fused_newton.newton_linear_pointwise(z0, W, b, activation=lp.activation, residual=lp.residual, tol=tol,
                                               max_iters=max_iters, impl="triton")
    if not res.converged:
        return None  # the general solver takes over, with its prefix-preserving fallback
    stats = newton.SolveStats(iterations=res.iterations, residual=res.residual, converged=True, prefix=call.L,
                              residuals=list(res.residuals), reason="fused", evaluations=res.iterations + 1)
    return res.traj.to(call.solve_dtype), stats


def _run_forward(spec, states, stacked, consts, invariants, length, tol, max_iters, jacobian, window,
                 keep_trajectory, impl, syms, adaptive=False):
    t0 = time.perf_counter()
    call = ChainCall(spec, states, stacked, consts, invariants, length, syms)
    lay = call.layout
    z0 = lay.pack(call.states, lead=0, dtype=call.solve_dtype)
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype)
    structure = call.structure_for(jacobian)
    from .distributed.chain_op import forward_over_ranks  # issue 17: option process_group

    over = forward_over_ranks(spec, call, z0, structure, tol, max_iters) if jacobian != "sequential" else None
    if over is not None:
        _record(spec, length, "forward", "layer-parallel", over[1], t0)
        return lay.unpack(over[0] if keep_trajectory else over[0][-1:], lead=1)
    learned = _SWITCHED.get(_switch_key(spec, "forward", call.states)) if adaptive else None
    if learned:
        Z = call.sequential(z0, keep_trajectory)
        stats = newton.SolveStats(converged=True, sequential_steps=length, reason=learned)
        _record(spec, length, "forward", "sequential", stats, t0)
        return lay.unpack(Z, lead=1)
    if jacobian == "sequential" or not _all_finite([z0]):
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
                else:
                    Z, stats = newton.newton_forward(
                        z0, length, lambda s, Zp, need: call.evaluate(s, Zp, need, structure), call.step,
                        structure=structure, tol=tol, max_iters=max_iters, solve_dtype=call.solve_dtype,
                        round_dtype=call.round_dtype, window=window, keep_trajectory=keep_trajectory, impl=impl,
                        parts=lay.sizes)
        except Exception as e:  # a template that cannot be batched, say: exact sequential answer instead
            log.warning("pcr_compile: parallel solve of %s failed (%s: %s); evaluating sequentially",
                        spec.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            stats = newton.SolveStats(fell_back=True, reason=f"{type(e).__name__}: {e}", sequential_steps=length)
            Z = call.sequential(z0, keep_trajectory)
    _record(spec, length, "forward", structure, stats, t0)
    if adaptive:
        _learn(spec, "forward", call.states, length, stats)
    return lay.unpack(Z, lead=1)


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
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype)
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
    from .distributed.chain_op import backward_over_ranks  # issue 17: option process_group

    over = backward_over_ranks(spec, call, Zprev, Z, cot, diff_stacked, diff_inv, tol, max_iters)
    if over is not None:
        _record(spec, length, "backward", "layer-parallel", over[1], t0)
        return _gradients(call, over[0], diff_stacked, diff_inv)
    learned = _SWITCHED.get(_switch_key(spec, "backward", call.states)) if adaptive else None
    if learned:
        out = _sequential_adjoint(call, Zprev, cot, diff_stacked, diff_inv)
        stats = newton.SolveStats(converged=True, reason=learned, sequential_steps=length)
        structure = "sequential"
    else:
        out, stats, structure = _parallel_adjoint(spec, call, Zprev, Z, cot, full_map, primals, diff_stacked,
                                                  diff_inv, structure, tol, max_iters, impl, lay.sizes, length)
    _record(spec, length, "backward", structure, stats, t0)
    if adaptive and not learned:
        _learn(spec, "backward", call.states, length, stats)
    return _gradients(call, out, diff_stacked, diff_inv)


def _parallel_adjoint(spec, call, Zprev, Z, cot, full_map, primals, diff_stacked, diff_inv, structure, tol,
                      max_iters, impl, parts, length):
    """The adjoint by refinement over all steps at once (or step by step where the template cannot be
    batched): (the pullback's outputs, stats, the strategy that ran)."""
    try:
        _, pullback = vjp(full_map, *primals)
        last: dict = {}

        def apply_vjp(lam: torch.Tensor) -> torch.Tensor:
            out = pullback(lam)
            last["lam"], last["out"] = lam, out
            return out[0]

        ok = _all_finite([Z, cot])
        A = call.approx_jacobian(Zprev, structure) if ok else None
        if A is None and structure in ("dense", "diagonal"):
            structure = "identity"

        def step_vjp(s: int, v: torch.Tensor) -> torch.Tensor:
            stacked = call.stacked
            _, pb = vjp(lambda z: call.step(s, z, stacked), Zprev[s])
            return pb(v)[0]

        with torch.no_grad():
            lam, stats = newton.adjoint_solve(cot, apply_vjp, A, step_vjp, structure=structure, tol=tol,
                                              max_iters=max_iters if ok else 0, impl=impl, parts=parts)
            out = last["out"] if last.get("lam") is lam else pullback(lam)
    except Exception as e:  # a template that cannot be batched, say: the exact adjoint step by step instead
        log.warning("pcr_compile: parallel adjoint of %s failed (%s: %s); evaluating sequentially",
                    spec.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        out = _sequential_adjoint(call, Zprev, cot, diff_stacked, diff_inv)
        stats = newton.SolveStats(fell_back=True, reason=f"{type(e).__name__}: {e}", sequential_steps=length)
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
