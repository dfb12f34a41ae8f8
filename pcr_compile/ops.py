"""The chain ops: one `torch.library.custom_op` per chain template, with its adjoint as a second op.

`pcr_compile::chain_<hash>(states, per_step, consts, invariants, syms, length, tol, max_iters, jacobian,
window, kernels, save_trajectory) -> [*finals, *trajectories]` solves the chain (see ``solve.py``); the
trajectories (every step's states, `(L, *state)`) are returned with `save_trajectory`, for the backward
and for graphs that read earlier steps' values, and take cotangents like any output; its autograd formula
calls `pcr_compile::chain_<hash>_adjoint(...)`, so AOTAutograd places the chain op in the forward graph
and the adjoint op in the backward graph, and Inductor compiles around both.

Both ops are tagged `cudagraph_unsafe` (where this torch has the tag): they decide on the host how many
iterations to run, which a CUDA graph would freeze at the count of its recording, so Inductor must not
capture a graph that contains them (`mode="reduce-overhead"`, `triton.cudagraphs`).

Ops are named by a hash of their template, not a counter: they outlive `torch._dynamo.reset()` within a
process, and Inductor caches compiled graphs by their content, so equal names must mean equal ops.
"""

from __future__ import annotations

import inspect
import threading

import torch
from torch import Tensor

from pcr_compile import solve
from pcr_compile.solve import ChainSpec

NAMESPACE = "pcr_compile"
# Bumped whenever the arguments or results of the chain or adjoint op change (it is hashed into op names).
SCHEMA_VERSION = 3
_SPECS: dict[str, ChainSpec] = {}
_OPS: dict[str, object] = {}
_lock = threading.Lock()
# Inductor keeps graphs holding ops with this tag out of CUDA graphs; older torch has no tag (and no kwarg).
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = {"tags": (_UNSAFE,)} if _UNSAFE is not None and "tags" in inspect.signature(
    torch.library.custom_op).parameters else {}


def _like(template: Tensor, value: Tensor) -> Tensor:
    """`value` copied into `torch.empty_like(template)`: the layout the fake kernels promise (Inductor checks
    strides)."""
    return torch.empty_like(template).copy_(value)


def _fresh(outputs: list[Tensor], inputs: list) -> list[Tensor]:
    """Custom ops may not return aliases of their inputs or of each other. Storages are compared directly:
    inside compiled graphs view tracking is off, so `tensor._base` cannot be trusted."""
    seen = {t.untyped_storage()._cdata for group in inputs for t in group}
    out = []
    for t in outputs:
        key = t.untyped_storage()._cdata
        if key in seen and t.numel():
            t = t.clone()
            key = t.untyped_storage()._cdata
        seen.add(key)
        out.append(t)
    return out


def get_chain_op(spec: ChainSpec):
    """The `OpOverload` for this chain template, created (once per process) on first use."""
    with _lock:
        if spec.name in _OPS:
            return _OPS[spec.name]
        _SPECS[spec.name] = spec
        op = _define(spec.name)
        _OPS[spec.name] = op
        return op


def _define(name: str):
    qual = f"{NAMESPACE}::{name}"

    @torch.library.custom_op(qual, mutates_args=(), **_TAGS)
    def chain(states: list[Tensor], per_step: list[Tensor], consts: list[Tensor], invariants: list[Tensor],
              syms: list[int], length: int, tol: float, max_iters: int, jacobian: str, window: int, kernels: str,
              save_trajectory: bool) -> list[Tensor]:
        spec = _SPECS[name]
        trajs = solve.run_forward(spec, states, per_step, consts, invariants, length, tol, max_iters, jacobian,
                                  window, keep_trajectory=save_trajectory, impl=kernels, syms=syms)
        finals = [_like(s, t[-1]) for s, t in zip(states, trajs)]
        if not save_trajectory:
            trajs = [t.new_empty((0,)) for t in trajs]
        return _fresh(finals + trajs, [states, per_step, consts, invariants])

    @chain.register_fake
    def _(states, per_step, consts, invariants, syms, length, tol, max_iters, jacobian, window, kernels,
          save_trajectory):
        finals = [torch.empty_like(s) for s in states]
        if save_trajectory:
            trajs = [s.new_empty((length, *s.shape)) for s in states]
        else:
            trajs = [s.new_empty((0,)) for s in states]
        return finals + trajs

    @torch.library.custom_op(qual + "_adjoint", mutates_args=(), **_TAGS)
    def adjoint(trajs: list[Tensor], states: list[Tensor], per_step: list[Tensor], consts: list[Tensor],
                invariants: list[Tensor], syms: list[int], grads: list[Tensor], traj_grads: list[Tensor],
                needs_grad: list[bool], length: int, tol: float, max_iters: int, jacobian: str,
                kernels: str) -> list[Tensor]:
        spec = _SPECS[name]
        d_states, d_per_step, d_inv = solve.run_backward(spec, trajs, states, per_step, consts, invariants, grads,
                                                         length, tol, max_iters, jacobian, impl=kernels, syms=syms,
                                                         traj_grads=traj_grads, needs_grad=needs_grad)
        # custom ops return no None: non-differentiable inputs get zeros.
        inputs = [*states, *per_step, *invariants]
        d_inputs = [*d_states, *d_per_step, *d_inv]
        out = [torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip(inputs, d_inputs)]
        return [_like(x, g) if g.stride() != torch.empty_like(x).stride() else g
                for x, g in zip(inputs, _fresh(out, [trajs, states, per_step, consts, invariants, grads, traj_grads]))]

    @adjoint.register_fake
    def _(trajs, states, per_step, consts, invariants, syms, grads, traj_grads, needs_grad, length, tol, max_iters,
          jacobian, kernels):
        return [torch.empty_like(t) for t in [*states, *per_step, *invariants]]

    def setup_context(ctx, inputs, output):
        (states, per_step, consts, invariants, syms, length, tol, max_iters, jacobian, window, kernels,
         save_trajectory) = inputs
        n = len(states)
        ctx.n = (len(states), len(per_step), len(consts), len(invariants))
        ctx.cfg = (list(syms), length, tol, max_iters, jacobian, kernels, save_trajectory)
        # Which per-step inputs and invariants need gradients: buffers (BatchNorm's running statistics, say)
        # are floating but not differentiable, and some ops refuse a VJP with respect to them.
        ctx.needs_grad = [bool(t.requires_grad) for t in [*per_step, *invariants]]
        ctx.save_for_backward(*output[n:], *states, *per_step, *consts, *invariants)

    def backward(ctx, grads):
        n_s, n_p, n_c, n_i = ctx.n
        syms, length, tol, max_iters, jacobian, kernels, save_trajectory = ctx.cfg
        if not save_trajectory:
            raise RuntimeError(
                f"{qual}: backward through a chain compiled without gradients (no input required grad and "
                "grad mode was off when it was compiled); recompile with grad enabled")
        saved = list(ctx.saved_tensors)
        trajs, rest = saved[:n_s], saved[n_s:]
        states, rest = rest[:n_s], rest[n_s:]
        per_step, rest = rest[:n_p], rest[n_p:]
        consts, invariants = rest[:n_c], rest[n_c:]
        g_finals = [torch.zeros_like(s) if g is None else g for s, g in zip(states, grads[:n_s])]
        # Cotangents of the trajectories: present when the graph reads earlier steps' values (exposed).
        g_trajs = list(grads[n_s:])
        if all(g is None for g in g_trajs):
            g_trajs = []
        else:
            g_trajs = [torch.zeros_like(t) if g is None else g for t, g in zip(trajs, g_trajs)]
        flat = adjoint(trajs, states, per_step, consts, invariants, syms, g_finals, g_trajs, ctx.needs_grad, length,
                       tol, max_iters, jacobian, kernels)
        d_states, flat = flat[:n_s], flat[n_s:]
        d_per_step, d_inv = flat[:n_p], flat[n_p:]
        return d_states, d_per_step, [None] * n_c, d_inv, [None] * len(syms), None, None, None, None, None, None, None

    chain.register_autograd(backward, setup_context=setup_context)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
