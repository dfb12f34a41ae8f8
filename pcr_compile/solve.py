"""Run-time side of a chain op: evaluate the block template over all steps and drive the solvers.

A chain is described by a :class:`ChainSpec` (made by the rewrite pass): an FX template of one step,
`template(*states, *per_step, *consts, *invariants) -> tuple(new_states)`, with

- states: the carried tensors, `(B, ...)` each;
- per_step: inputs that differ per step (layer parameters), passed flat, step-major, and stacked here;
- consts: per-step constants lifted out of the graph, already stacked `(L, ...)`;
- invariants: inputs shared by every step.

States are *packed* for the linear algebra: every state is flattened to `(B, w_i)` and concatenated
along features, `(B, w)`; when the states do not share a leading batch dim, the whole state is one row
`(1, w)`. Jacobians are per row: exact when rows do not interact (the usual batch semantics), an
approximation otherwise, which the residual checks of both solves catch (the answer stays exact).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch.func import vjp, vmap

from pcr_compile.kernels import newton
from pcr_compile.records import SolveRecord, emit

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
    kind: str = "layers"


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
        return [p.reshape(*lead_shape, *shape).to(dt).contiguous()
                for p, shape, dt in zip(parts, self.shapes, self.dtypes)]


class ChainCall:
    """One call of a chain op with its inputs: closures over the template for the solvers."""

    def __init__(self, spec: ChainSpec, states, per_step, consts, invariants, length: int):
        self.spec = spec
        self.L = length
        k = spec.n_per_step
        self.stacked = [torch.stack(per_step[s::k]) for s in range(k)]  # each (L, ...)
        self.consts = list(consts)
        self.invariants = list(invariants)
        self.states = list(states)
        self.layout = Layout(self.states)
        dtype = self.states[0].dtype
        self.solve_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.round_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        n_s, n_c, n_i = spec.n_state, spec.n_consts, spec.n_invariants
        self._in_dims = (0,) * (n_s + k + n_c) + (None,) * n_i
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
        out = self._batched(*prev, *stacked, *consts, *invariants)
        return self.layout.pack(list(out), lead=1, dtype=self.solve_dtype)

    def evaluate(self, start: int, Zprev: torch.Tensor, need_A: bool, structure: str):
        if not need_A:
            with torch.no_grad():
                return self.batched(Zprev, start=start), None
        F, pullback = vjp(lambda Zp: self.batched(Zp, start=start), Zprev)
        J = self.jacobian_from(pullback, Zprev)
        if structure == "diagonal":
            J = J.diagonal(dim1=-2, dim2=-1)
        return F.detach(), J.detach()

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
        args = [*prev, *(s[l] for s in stacked), *(c[l] for c in self.consts), *invariants]
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
                     seconds=time.perf_counter() - t0))


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def run_forward(spec: ChainSpec, states, per_step, consts, invariants, length: int, tol: float, max_iters: int,
                jacobian: str, window: int = 0, keep_trajectory: bool = True) -> list[torch.Tensor]:
    """Solve the chain; returns the trajectories `(L, *state_shape)`, one per state, in the states' dtypes
    (only the last step, `(1, *state_shape)`, when `keep_trajectory` is False)."""
    with _functorch_ready():
        return _run_forward(spec, states, per_step, consts, invariants, length, tol, max_iters, jacobian, window,
                            keep_trajectory)


def _run_forward(spec, states, per_step, consts, invariants, length, tol, max_iters, jacobian, window,
                 keep_trajectory):
    t0 = time.perf_counter()
    call = ChainCall(spec, states, per_step, consts, invariants, length)
    lay = call.layout
    z0 = lay.pack(call.states, lead=0, dtype=call.solve_dtype)
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype)
    if jacobian == "sequential" or not _all_finite(call.states):
        # Non-finite input data: eager's NaN/inf pattern is only reproduced by evaluating in order.
        Z, stats = call.sequential(z0, keep_trajectory), newton.SolveStats(
            fell_back=jacobian != "sequential", converged=jacobian == "sequential",
            reason="non-finite input state" if jacobian != "sequential" else "")
    else:
        try:
            with torch.no_grad():
                Z, stats = newton.newton_forward(
                    z0, length, lambda s, Zp, need: call.evaluate(s, Zp, need, jacobian), call.step,
                    structure=jacobian, tol=tol, max_iters=max_iters, solve_dtype=call.solve_dtype,
                    round_dtype=call.round_dtype, window=window, keep_trajectory=keep_trajectory)
        except Exception as e:  # a template that cannot be batched, say: exact sequential answer instead
            log.warning("pcr_compile: parallel solve of %s failed (%s: %s); evaluating sequentially",
                        spec.name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            stats = newton.SolveStats(fell_back=True, reason=f"{type(e).__name__}: {e}")
            Z = call.sequential(z0, keep_trajectory)
    _record(spec, length, "forward", jacobian, stats, t0)
    return lay.unpack(Z, lead=1)


def run_backward(spec: ChainSpec, trajs, states, per_step, consts, invariants, grads, length: int, tol: float,
                 max_iters: int, jacobian: str):
    """Adjoint of the chain at the converged trajectory.

    Returns gradients for (states, per_step flat, invariants); None where an input is not floating.
    """
    with _functorch_ready():
        return _run_backward(spec, trajs, states, per_step, consts, invariants, grads, length, tol, max_iters,
                             jacobian)


def _run_backward(spec, trajs, states, per_step, consts, invariants, grads, length, tol, max_iters, jacobian):
    t0 = time.perf_counter()
    call = ChainCall(spec, states, per_step, consts, invariants, length)
    lay = call.layout
    sd = call.solve_dtype
    tol = tol if tol > 0 else newton.default_tol(call.states[0].dtype)
    z0 = lay.pack(call.states, lead=0, dtype=sd)
    Z = lay.pack(list(trajs), lead=1, dtype=sd)
    Zprev = torch.cat([z0.unsqueeze(0), Z[:-1]], dim=0)
    grads = [torch.zeros_like(s) if g is None else g for s, g in zip(call.states, grads)]
    cot = torch.zeros_like(Z)
    cot[-1] = lay.pack(grads, lead=0, dtype=sd)

    diff_stacked = [i for i, s in enumerate(call.stacked) if s.is_floating_point()]
    diff_inv = [i for i, s in enumerate(call.invariants) if s.is_floating_point()]

    def full_map(Zp, *params):
        stacked = list(call.stacked)
        inv = list(call.invariants)
        for i, p in zip(diff_stacked, params[: len(diff_stacked)]):
            stacked[i] = p
        for i, p in zip(diff_inv, params[len(diff_stacked):]):
            inv[i] = p
        return call.batched(Zp, stacked, inv)

    primals = [Zprev, *(call.stacked[i] for i in diff_stacked), *(call.invariants[i] for i in diff_inv)]
    _, pullback = vjp(full_map, *primals)
    last: dict = {}

    def apply_vjp(lam: torch.Tensor) -> torch.Tensor:
        out = pullback(lam)
        last["lam"], last["out"] = lam, out
        return out[0]

    structure = jacobian if jacobian in ("dense", "diagonal", "identity", "zero") else "identity"
    A = None
    ok = _all_finite([Z, cot])
    if ok and structure in ("dense", "diagonal"):
        _, pz = vjp(call.batched, Zprev)
        A = call.jacobian_from(pz, Zprev).detach()
        if structure == "diagonal":
            A = A.diagonal(dim1=-2, dim2=-1)

    def step_vjp(s: int, v: torch.Tensor) -> torch.Tensor:
        stacked = call.stacked
        _, pb = vjp(lambda z: call.step(s, z, stacked), Zprev[s])
        return pb(v)[0]

    with torch.no_grad():
        if ok:
            lam, stats = newton.adjoint_solve(cot, apply_vjp, A, step_vjp, structure=structure, tol=tol,
                                              max_iters=max_iters)
        else:
            lam, stats = newton.adjoint_solve(cot, apply_vjp, A, step_vjp, structure=structure, tol=tol,
                                              max_iters=0)
        out = last["out"] if last.get("lam") is lam else pullback(lam)
    _record(spec, length, "backward", structure, stats, t0)

    d_states = lay.unpack(out[0][0], lead=0)
    d_stacked = [None] * len(call.stacked)
    for i, g in zip(diff_stacked, out[1: 1 + len(diff_stacked)]):
        d_stacked[i] = g
    d_inv = [None] * len(call.invariants)
    for i, g in zip(diff_inv, out[1 + len(diff_stacked):]):
        d_inv[i] = g.to(call.invariants[i].dtype)
    k = spec.n_per_step
    d_per_step = []
    for l in range(length):
        for s in range(k):
            g = d_stacked[s]
            d_per_step.append(None if g is None else g[l].to(per_step[l * k + s].dtype))
    return d_states, d_per_step, d_inv
