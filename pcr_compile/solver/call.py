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

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.func import vjp, vmap

from pcr_compile.kernels.settings import MAX_DENSE_W, compute_dtype
from pcr_compile.passes.structure import LinearPointwise

# Dense Jacobians are materialised only up to the dense kernels' width when "diagonal" needs a generic diagonal.
DENSE_DIAGONAL_MAX_WIDTH = MAX_DENSE_W


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
    compute_dtype: torch.dtype | None = None  # torch.autocast's dtype for the steps (the template enters it)


def packed_geometry(shapes: list[tuple[int, ...]]) -> tuple[bool, int, list[int]]:
    """The packing rule: (batched, rows B, features per state). States that share a leading batch dim pack
    to `(B, sum of the rest)`; otherwise the whole state is one row `(1, w)`. (The cost model reads it too.)"""
    leading = {s[0] if len(s) >= 2 else None for s in shapes}
    batched = len(leading) == 1 and None not in leading
    B = int(shapes[0][0]) if batched else 1
    return batched, B, [math.prod(s[1:]) if batched else math.prod(s) for s in shapes]


class Layout:
    """Packing of a list of state tensors into one `(..., B, w)` tensor and back."""

    def __init__(self, states: list[torch.Tensor]):
        self.shapes = [tuple(s.shape) for s in states]
        self.dtypes = [s.dtype for s in states]
        self.batched, self.B, self.sizes = packed_geometry(self.shapes)
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
        self.solve_dtype = compute_dtype(dtype)
        self.round_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
        n_s, n_c, n_i = spec.n_state, spec.n_consts, spec.n_invariants
        self._in_dims = (0,) * (n_s + k + n_c) + (None,) * (n_i + len(self.syms))
        self._batched = vmap(self._call_template, in_dims=self._in_dims)

    def _call_template(self, *args):
        return tuple(self.spec.template(*args))

    # --- evaluation of all steps at once ---------------------------------------------------------
    def batched(self, Zprev: torch.Tensor, stacked=None, invariants=None, start: int = 0, copies: int = 1
                ) -> torch.Tensor:
        """F = [f_l(Zprev_l)] for steps start .. start + len(Zprev), packed (n, B, w) in solve dtype. With
        `copies` = k, `Zprev` is `(k n, B, w)`: k guesses for the same n steps one after the other, evaluated in
        one call as k n steps (each step's per-step inputs repeated k times; the template is vmapped over
        steps, so the copies cannot interact, whatever the template does across its batch rows)."""
        stacked = self.stacked if stacked is None else stacked
        invariants = self.invariants if invariants is None else invariants
        n = Zprev.shape[0] // copies
        if start or n != self.L:
            stacked = [t[start: start + n] for t in stacked]
            consts = [t[start: start + n] for t in self.consts]
        else:
            consts = self.consts
        if copies > 1:
            stacked, consts = ([torch.cat([t] * copies) for t in ts] for ts in (stacked, consts))
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


@contextlib.contextmanager
def _functorch_ready():
    """A context under which torch.func transforms work inside the op.

    Compiled graphs call custom ops with most dispatch keys excluded (functorch's among them), which
    breaks `vmap`/`vjp` ("Cannot access storage of TensorWrapper"); re-allow those keys for the solve.
    Saved-tensor hooks open around the call (`torch.autograd.graph.save_on_cpu()`, non-reentrant
    `torch.utils.checkpoint` around a compiled model) make every `vjp` raise ("torch.func ... don't yet support
    saved tensor hooks"), and the solve fell back to sequential evaluation: they are set aside for the solve,
    whose own autograd graphs never leave it, and put back after.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _CLEARED_KEYS:
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None and exclude.has(key):
            exclude = exclude.remove(key)
    hooks = []  # the default hooks' stack, top first
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
            yield
    finally:
        for pack, unpack in reversed(hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
