"""FX utilities every pass shares: a node's example value, its argument leaves, its arguments bound to the target's
Python signature, in-place detection, and the clean-up after a rewrite. Meta keys belong to the passes that write
them (``functionalize.py``: ``KEPT_META``, ``DEFERRED_META``)."""

from __future__ import annotations

import functools
import inspect
import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

COMPUTE_OPS = ("call_function", "call_method", "call_module")

INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor, operator.setitem,
                     operator.imatmul, operator.ilshift, operator.irshift}
# Out-of-place operators whose names end in "_" (`a | b`, `a & b`, `not a`): not the in-place naming convention.
OUT_OF_PLACE_OPERATORS = {operator.or_, operator.and_, operator.not_}


def node_value(n: Node):
    """The example value Dynamo (``example_value``) or a fake-tensor pass (``val``) recorded for ``n``."""
    return n.meta.get("example_value", n.meta.get("val"))


def is_tensor_node(n: Node) -> bool:
    return isinstance(node_value(n), torch.Tensor)


def arg_leaves(n: Node) -> list:
    """The flattened leaves of ``(n.args, n.kwargs)``."""
    return tree_flatten((n.args, n.kwargs))[0]


@functools.cache
def _signature(target) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except Exception:  # builtins and C extensions without a signature; unhashable targets miss the cache
        return None


def bound_arguments(n: Node) -> inspect.BoundArguments | None:
    """The call's arguments bound to its Python signature, defaults applied (None for ops without one)."""
    if n.op != "call_function":
        return None
    try:
        sig = _signature(n.target)
    except TypeError:  # unhashable target
        sig = None
    if sig is None:
        return None
    try:
        bound = sig.bind(*n.args, **n.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound


def mutates_in_place(n: Node) -> bool:
    """Whether `n` is an in-place op (`x += y`, `relu(x, inplace=True)` or `relu(x, True)`, `x.mul_(s)`,
    `torch.relu_(x)`, `torch.tanh(a, out=h)`, or batch/instance norm writing running statistics)."""
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target in INPLACE_OPERATORS or n.kwargs.get("out") is not None:
        return True
    if n.target in OUT_OF_PLACE_OPERATORS:
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return True
    bound = bound_arguments(n)
    if bound is None:  # torch.batch_norm / torch.instance_norm (no Python signature): assume they write
        return name in ("batch_norm", "instance_norm")
    args = bound.arguments
    if args.get("inplace") is True:
        return True
    # Training-mode normalisation with running statistics updates them in place.
    training = args.get("training", args.get("use_input_stats")) if name in ("batch_norm", "instance_norm") else None
    return bool(training) and args.get("running_mean") is not None


# Modules of the functions that move functorch's and autograd's state: Dynamo traces torch.func.grad / vmap /
# jvp into the graph as calls of these (`_grad_increment_nesting`, `_wrap_for_grad`, `_unwrap_for_grad`,
# `_saved_tensors_hooks_disable`, ...), often with no users, and FX's purity check does not know them.
STATE_MODULES = ("torch._C._functorch", "torch._C._autograd", "torch._functorch")


def keep_in_graph(n: Node) -> bool:
    """`is_impure_node` for dead-code elimination: FX's own check misses in-place methods and operators,
    whose results are often unused (`x.mul_(s)` as a statement) but whose effect is not, and functorch's and
    autograd's state calls (a traced torch.func transform's levels: with them removed, Inductor's compile of the
    graph fails functorch's assert on its level stack)."""
    if n.op == "call_function" and (getattr(n.target, "__module__", None) or "").startswith(STATE_MODULES):
        return True
    return n.is_impure() or mutates_in_place(n)


def cleanup(gm: GraphModule, is_impure_node=None) -> GraphModule:
    """After a rewrite: dead-code elimination (``keep_in_graph`` by default), lint, recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure_node or keep_in_graph)
    gm.graph.lint()
    gm.recompile()
    return gm
