"""The chain ops: one `torch.library.custom_op` per chain template, with its adjoint as a second op.

`pcr_compile::chain_<hash>(...)` solves the chain (``pcr_compile.solver``); `pcr_compile::chain_<hash>_adjoint(...)`
is its autograd formula, so AOTAutograd places the chain op in the forward graph and the adjoint op in the
backward graph, and Inductor compiles around both. The arguments of both ops are defined once, below
(`CHAIN_ARGS`, `ADJOINT_ARGS`): the schemas, the fake kernels, the autograd wiring and the call in the
rewritten graph (`passes/rewrite.py`, through :func:`chain_call_args`) are all built from those lists, and
a hash of the two schemas and of this module's source is part of every op's name (so a cached compiled
graph never calls an op whose arguments or autograd wiring have changed since). No argument list grows with
the chain's length: per-step inputs arrive stacked, one `(L, ...)` tensor per group (all groups stacked by
one `pcr_compile::stack_groups` call in the rewritten graph), and their gradients leave the same way.

A graph that is its chain ops alone runs outside AOTAutograd (``backend.solves_only``): then the ops'
registered autograd is the backward, and with grad mode off the graph calls their implementations directly
(`no_grad_impl`).

The chain op returns the last step's states, then (with `save_trajectory`) every step's states stacked
`(L, *state)`, for the backward and for graphs that read earlier steps' values; those take cotangents
like any output.

Both ops are tagged `cudagraph_unsafe` (where this torch has the tag): they decide on the host how many
iterations to run, which a CUDA graph would freeze at the count of its recording, so Inductor must not
capture a graph that contains them (`mode="reduce-overhead"`, `triton.cudagraphs`).

Ops are named by a hash of their template, not a counter: they outlive `torch._dynamo.reset()` within a
process, and Inductor caches compiled graphs by their content, so equal names must mean equal ops.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections import namedtuple
from pathlib import Path

import torch
from torch import Tensor

from pcr_compile import solver
from pcr_compile.passes.rewrite import groups, stack_each
from pcr_compile.solver import ChainSpec

NAMESPACE = "pcr_compile"

# (name, schema type) of every argument, in order: the one definition of both ops' arguments.
CHAIN_ARGS = (
    ("states", "Tensor[]"),  # z_0, one tensor per carried state
    ("stacked", "Tensor[]"),  # per-step inputs, one (L, ...) tensor per group
    ("consts", "Tensor[]"),  # lifted / folded per-step constants, (L, ...) each
    ("invariants", "Tensor[]"),  # inputs shared by every step
    ("syms", "SymInt[]"),  # symbolic sizes shared by every step
    ("length", "int"),
    ("tol", "float"),
    ("max_iters", "int"),
    ("jacobian", "str"),
    ("window", "int"),
    ("sampler_jacobian", "str"),  # a sampler chain's update: "auto" | "scalar" | "identity" (solver/sampler.py)
    ("kernels", "str"),
    ("save_trajectory", "bool"),
    ("adaptive", "bool"),  # mode="auto": switch to sequential after a solve that did not pay (solver/auto_switch.py)
)
ADJOINT_ARGS = (
    ("trajs", "Tensor[]"),  # every step's states (L, *state), from the forward
    ("states", "Tensor[]"),
    ("stacked", "Tensor[]"),
    ("consts", "Tensor[]"),
    ("invariants", "Tensor[]"),
    ("syms", "SymInt[]"),
    ("grads", "Tensor[]"),  # cotangents of the final states
    ("traj_grads", "Tensor[]"),  # cotangents of the trajectories ([] when none)
    ("needs_grad", "bool[]"),  # per stacked group, then per invariant
    ("length", "int"),
    ("tol", "float"),
    ("max_iters", "int"),
    ("jacobian", "str"),
    ("kernels", "str"),
    ("adaptive", "bool"),
)
ChainArgs = namedtuple("ChainArgs", [n for n, _ in CHAIN_ARGS])
AdjointArgs = namedtuple("AdjointArgs", [n for n, _ in ADJOINT_ARGS])


def _schema(args) -> str:
    return "(" + ", ".join(f"{t} {n}" for n, t in args) + ") -> Tensor[]"


CHAIN_SCHEMA, ADJOINT_SCHEMA = _schema(CHAIN_ARGS), _schema(ADJOINT_ARGS)
# Hashed into every op name (backend.chain_spec): derived from the schemas and from this module's own source
# (the ops' autograd wiring decides what a traced backward graph holds, and AOTAutograd's on-disk cache keys
# graphs by op name, not by the Python behind the op), never bumped by hand.
SCHEMA_KEY = hashlib.sha1((CHAIN_SCHEMA + ADJOINT_SCHEMA).encode() + Path(__file__).read_bytes()).hexdigest()[:12]

_SPECS: dict[str, ChainSpec] = {}
_OPS: dict[str, object] = {}
_IMPLS: dict[str, object] = {}  # each chain op's implementation, undecorated (`no_grad_impl`)
_lock = threading.Lock()
# Inductor keeps graphs holding ops with this tag out of CUDA graphs; older torch has no tag (and no kwarg).
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = {"tags": (_UNSAFE,)} if _UNSAFE is not None and "tags" in inspect.signature(
    torch.library.custom_op).parameters else {}


@torch.library.custom_op(f"{NAMESPACE}::stack_groups", mutates_args=())
def stack_groups(xs: list[Tensor], sizes: list[int]) -> list[Tensor]:
    """Every per-step group of a chain stacked in one op call: `xs` is the groups' tensors one group after the
    other, `sizes[k]` the length of group k; output k is `torch.stack` of group k. Opaque to Inductor: as plain
    `torch.stack`s in the graph, Inductor generates a copy kernel per step (L kernels to write and compile: the
    first call of a 1024-layer MLP took as long as Inductor's own compile). One call for all groups: a block
    with many parameters has many groups, and each custom-op call costs its dispatch. Its gradient is the rows
    of each stacked gradient: views, no copy."""
    if sum(sizes) != len(xs):
        raise ValueError(f"stack_groups: sizes {list(sizes)} do not add up to the {len(xs)} tensors given")
    return stack_each(xs, sizes)


@stack_groups.register_fake
def _(xs, sizes):
    # torch.stack itself on the fake tensors: its strides follow the inputs' (a group of channels-last
    # activations stacks channels-last), and Inductor checks the real output against these.
    return stack_each(xs, sizes)


def _stack_groups_setup(ctx, inputs, output):
    xs, sizes = inputs
    ctx.sizes = list(sizes)
    # One op for all groups: autograd would mark every output as requiring grad when any input does. A group
    # of buffers (BatchNorm's running statistics) must stay non-differentiable, as its own stack would be
    # (the chain's VJP may not take gradients with respect to it).
    frozen = [out for out, group in zip(output, groups(xs, sizes)) if not any(x.requires_grad for x in group)]
    if frozen:
        ctx.mark_non_differentiable(*frozen)


def _stack_groups_backward(ctx, grads):
    rows = []
    for n, g in zip(ctx.sizes, grads):
        rows.extend([None] * n if g is None else g.unbind(0))
    return rows, None


stack_groups.register_autograd(_stack_groups_backward, setup_context=_stack_groups_setup)
STACK_GROUPS_OP = torch.ops.pcr_compile.stack_groups.default


def chain_call_args(**kw) -> tuple:
    """The chain op's positional arguments from keywords named as in `CHAIN_ARGS` (the rewrite's call)."""
    return tuple(ChainArgs(**kw))


def _like(template: Tensor, value: Tensor) -> Tensor:
    """`value` in the layout of `torch.empty_like(template)` (the layout the fake kernels promise; Inductor
    checks strides): a copy only where the layouts differ."""
    if value.stride() == template.stride() and template.is_contiguous():
        return value  # the usual case, decided without allocating: empty_like keeps a contiguous layout
    like = torch.empty_like(template)
    return value if value.stride() == like.stride() else like.copy_(value)


def _final(state: Tensor, traj: Tensor) -> Tensor:
    """The last step of `traj` as a new tensor laid out as `torch.empty_like(state)` (the fake kernel's
    promise) in `state`'s dtype: a copy, so the output does not keep the (L, ...) trajectory alive."""
    if traj.dtype == state.dtype and state.is_contiguous():
        if traj.shape[0] == 1 and traj.is_contiguous():  # the last step alone (no trajectory kept): one clone
            return traj.clone().squeeze(0)
        last = traj[-1]
        if last.is_contiguous():
            return last.clone()
    return torch.empty_like(state).copy_(traj[-1])


def _fresh(outputs: list[Tensor], inputs: list) -> list[Tensor]:
    """Custom ops may not return aliases of their inputs or of each other. Storages are compared directly:
    inside compiled graphs view tracking is off, so `tensor._base` cannot be trusted. (The lists hold a few
    tensors per carried state and per-step group: nothing here grows with the chain's length.)"""
    seen = {t.untyped_storage()._cdata for group in inputs for t in group}
    out = []
    for t in outputs:
        key = t.untyped_storage()._cdata
        if key in seen:  # empty tensors too: the op's alias check compares their storages as well
            t = t.clone()
            key = t.untyped_storage()._cdata
        seen.add(key)
        out.append(t)
    return out


def no_grad_impl(target):
    """The plain Python implementation of one of this module's ops, for a graph that runs with grad mode off
    and outside AOTAutograd (the backend's solves-only route): the same function the op calls, without the
    custom op's dispatch, autograd wrapper and output-alias checks (about 20 us a call). None for anything
    else."""
    if target is STACK_GROUPS_OP:
        return stack_each
    if getattr(target, "namespace", None) == NAMESPACE:
        return _IMPLS.get(target._schema.name.split("::", 1)[1])
    return None


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

    spec = _SPECS[name]

    def run(states, stacked, consts, invariants, syms, length, tol, max_iters, jacobian, window, sampler_jacobian,
            kernels, save_trajectory, adaptive) -> list[Tensor]:  # CHAIN_ARGS, in order (checked below)
        trajs = solver.run_forward(spec, states, stacked, consts, invariants, length, tol, max_iters, jacobian,
                                   window, keep_trajectory=save_trajectory, impl=kernels, syms=syms,
                                   adaptive=adaptive, sampler_jacobian=sampler_jacobian)
        finals = [_final(s, t) for s, t in zip(states, trajs)]  # one state each, not L
        if not save_trajectory:  # the finals alone, each allocated here: none can alias an input
            return finals
        return _fresh(finals + trajs, [states, stacked, consts, invariants])

    # The implementation's parameters are CHAIN_ARGS spelled out (a namedtuple per call costs more than the
    # rest of this wrapper); this keeps the two from drifting apart.
    assert tuple(inspect.signature(run).parameters) == ChainArgs._fields, "run() must take CHAIN_ARGS in order"

    _IMPLS[name] = run
    chain = torch.library.custom_op(qual, mutates_args=(), schema=CHAIN_SCHEMA, **_TAGS)(run)

    @chain.register_fake
    def _(*args):
        a = ChainArgs(*args)
        finals = [torch.empty_like(s) for s in a.states]
        if not a.save_trajectory:
            return finals
        return finals + [s.new_empty((a.length, *s.shape)) for s in a.states]

    @torch.library.custom_op(qual + "_adjoint", mutates_args=(), schema=ADJOINT_SCHEMA, **_TAGS)
    def adjoint(*args) -> list[Tensor]:
        a = AdjointArgs(*args)
        d_states, d_stacked, d_inv = solver.run_backward(
            _SPECS[name], a.trajs, a.states, a.stacked, a.consts, a.invariants, a.grads, a.length, a.tol,
            a.max_iters, a.jacobian, impl=a.kernels, syms=a.syms, traj_grads=a.traj_grads, needs_grad=a.needs_grad,
            adaptive=a.adaptive)
        # custom ops return no None: non-differentiable inputs get zeros.
        inputs = [*a.states, *a.stacked, *a.invariants]
        out = [torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip(inputs, [*d_states, *d_stacked,
                                                                                            *d_inv])]
        taken = [a.trajs, a.states, a.stacked, a.consts, a.invariants, a.grads, a.traj_grads]
        return [_like(x, g) for x, g in zip(inputs, _fresh(out, taken))]

    @adjoint.register_fake
    def _(*args):
        a = AdjointArgs(*args)
        return [torch.empty_like(t) for t in [*a.states, *a.stacked, *a.invariants]]

    def setup_context(ctx, inputs, output):
        a = ChainArgs(*inputs)
        n = len(a.states)
        ctx.a = a._replace(states=None, stacked=None, consts=None, invariants=None)  # the non-tensor arguments
        ctx.n = (n, len(a.stacked), len(a.consts), len(a.invariants))
        # Which per-step groups and invariants need gradients: buffers (BatchNorm's running statistics, say)
        # are floating but not differentiable, and some ops refuse a VJP with respect to them.
        ctx.needs_grad = [bool(t.requires_grad) for t in [*a.stacked, *a.invariants]]
        ctx.save_for_backward(*output[n:], *a.states, *a.stacked, *a.consts, *a.invariants)

    def backward(ctx, grads):
        n_s, n_p, n_c, n_i = ctx.n
        a = ctx.a
        if not a.save_trajectory:
            raise RuntimeError(
                f"{qual}: backward through a chain compiled without gradients (no input required grad and "
                "grad mode was off when it was compiled); recompile with grad enabled")
        saved = list(ctx.saved_tensors)
        trajs, rest = saved[:n_s], saved[n_s:]
        states, rest = rest[:n_s], rest[n_s:]
        stacked, rest = rest[:n_p], rest[n_p:]
        consts, invariants = rest[:n_c], rest[n_c:]
        g_finals = [torch.zeros_like(s) if g is None else g for s, g in zip(states, grads[:n_s])]
        # Cotangents of the trajectories: present when the graph reads earlier steps' values (exposed).
        g_trajs = list(grads[n_s:])
        if all(g is None for g in g_trajs):
            g_trajs = []
        else:
            g_trajs = [torch.zeros_like(t) if g is None else g for t, g in zip(trajs, g_trajs)]
        flat = adjoint(*AdjointArgs(trajs=trajs, states=states, stacked=stacked, consts=consts, invariants=invariants,
                                    syms=a.syms, grads=g_finals, traj_grads=g_trajs, needs_grad=ctx.needs_grad,
                                    length=a.length, tol=a.tol, max_iters=a.max_iters, jacobian=a.jacobian,
                                    kernels=a.kernels, adaptive=a.adaptive))
        d_states, flat = flat[:n_s], flat[n_s:]
        d_stacked, d_inv = flat[:n_p], flat[n_p:]
        # The gradients' structure must be the inputs' as torch.library flattens them: a list holding anything
        # but tensors (the symbolic sizes) is one leaf, so its gradient is one None; an empty list stays a list.
        grads_in = ChainArgs(states=d_states, stacked=d_stacked, consts=[None] * n_c, invariants=d_inv,
                             syms=None if a.syms else [], **{k: None for k in ChainArgs._fields[5:]})
        return tuple(grads_in)

    chain.register_autograd(backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{qual}: double backward (a gradient of a gradient, create_graph=True) through a deeppcr chain is not "
            "supported: the chain's adjoint solve has no derivative of its own (nor does torch.compile's AOTAutograd "
            "support double backward); run the model uncompiled, or with backend='eager', where second derivatives "
            "are needed")

    # A clear error instead of the generic "no autograd formula" when a double backward reaches the adjoint.
    adjoint.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
