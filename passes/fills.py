"""Fills with a per-step value, as an add the finder can lift: `full_like(x, v)` -> `zeros_like(x) + v`.

A time-dependent vector field feeds its time in as a tensor the shape of (part of) the state, most often
`torch.full_like(x[:, :1], t)` or `x.new_full((B, 1), t)`, with `t` a Python float that differs at every
step. Dynamo bakes each step's `t` into its fill node as a literal; the finder lifts literals that differ
between steps into a per-step input only where the op takes a tensor in their place (arithmetic), which a
fill does not (`fill_value` is a Scalar: under `vmap` it would be read with `.item()`). So the chain of an ODE
integrator (Euler, RK4, ...) over `f(t, x)` was declined. The same value as a zero fill plus the number is an
add, which lifts. A hand-written sampler loop passes its timestep as `torch.full((B,), i, dtype=torch.long)`,
which the finder folds into a per-step input while its size is a literal, but not once Dynamo makes the batch
size symbolic (`dynamic=True`, or a second call with another batch size): such a `full` is rewritten too.

The rewrite is exact where the add's result has the fill's dtype: a floating fill with any real number, an
integer fill with an int (a float into an integer fill would promote; such fills stay as they are, as do
bool and complex fills). `zeros + v` equals `v` (but for the sign of a zero fill value). Applied in the
backend's prepared copy of the graph (``pipeline.PREPARE``); AOTAutograd and Inductor see a zero fill and an
add, which Inductor fuses back into one kernel.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten

from .fx_utils import node_value

# (kind, target) -> (the zero fill taking the same other arguments, the fill value's position)
_FILLS = {("call_function", torch.full_like): (torch.zeros_like, 1),  # full_like(x, v, ...)
          ("call_method", "new_full"): ("new_zeros", 2),  # x.new_full(size, v, ...)
          ("call_function", torch.full): (torch.zeros, 1)}  # full(size, v, ...): with a symbolic size only


def _fill_value(n: Node):
    """The fill value of a fill node (positional or `fill_value=`)."""
    at = _FILLS[(n.op, n.target)][1]
    return n.args[at] if len(n.args) > at else n.kwargs.get("fill_value")


def rewritable_fill(n: Node) -> bool:
    """Whether `n` is a fill with a literal value whose rewrite into `zeros + v` keeps its dtype."""
    if (n.op, n.target) not in _FILLS:
        return False
    if n.target is torch.full and not any(isinstance(a, Node) for a in tree_flatten((n.args, n.kwargs))[0]):
        return False  # all literals: the finder folds its per-step values (chains/validate.py FOLDABLE_TARGETS)
    v, out = _fill_value(n), node_value(n)
    if type(v) not in (int, float) or not isinstance(out, torch.Tensor) or out.is_complex():
        return False
    if n.kwargs.get("requires_grad"):  # a leaf the graph differentiates by: `zeros + v` would not be one
        return False
    if out.dtype.is_floating_point:
        return True
    return out.dtype != torch.bool and type(v) is int


def _fresh_like(val):
    """A new example value with `val`'s metadata (not sharing its storage: passes compare storages)."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty_like(val)
    with mode:
        return torch.empty_like(val)


def rewrite_fills(graph: Graph) -> int:
    """Rewrite every `rewritable_fill` node of `graph` into a zero fill plus its value; returns how many."""
    count = 0
    for n in list(graph.nodes):
        if not rewritable_fill(n):
            continue
        zero_target, at = _FILLS[(n.op, n.target)]
        args = tuple(n.args[:at]) + tuple(n.args[at + 1:])
        kwargs = {k: v for k, v in n.kwargs.items() if k != "fill_value"}
        if n.target is torch.full:  # full infers its dtype from the value, zeros would not
            kwargs["dtype"] = node_value(n).dtype
        with graph.inserting_before(n):
            if n.op == "call_method":
                zeros = graph.call_method(zero_target, args, kwargs)
            else:
                zeros = graph.call_function(zero_target, args, kwargs)
            added = graph.call_function(torch.add, (zeros, _fill_value(n)))
        zeros.meta.update({k: v for k, v in n.meta.items() if k not in ("example_value", "val")})
        zeros.meta["example_value"] = _fresh_like(node_value(n))
        added.meta.update(n.meta)
        n.replace_all_uses_with(added)
        graph.erase_node(n)
        count += 1
    return count
