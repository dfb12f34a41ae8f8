"""Ops whose number arguments may differ per step although the op itself takes no tensor there.

A chain whose steps differ only in a literal (a per-layer clamp bound, a leaky-ReLU slope, an ODE step's
`torch.add(y, k, alpha=dt)`) lifts that literal to a per-step 0-d tensor (``validate._const_ref``). Ops in
``validate.LIFTABLE_TARGETS`` accept the tensor in the literal's place. The ops below do not all accept it, or
take the number as a keyword argument; each has a :class:`ScalarForm`: the parameters that may carry a
per-step number, and, where the op itself refuses a tensor there, an equivalent built from ops that accept
one (the same values and the same derivative everywhere, ties included), used in the chain's template
(``passes/rewrite.build_template``) only when a lifted number reaches it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node


class ScalarForm(NamedTuple):
    params: tuple[str, ...]  # the op's parameters in positional order (the tensor first)
    liftable: frozenset[str]  # those that may carry a per-step number
    # (graph, bound arguments by name) -> the equivalent node; None where the op takes a 0-d tensor itself
    build: Callable[[Graph, dict], Node] | None = None
    fixed: tuple[tuple[str, object], ...] = ()  # (parameter, the only value accepted): `inplace=False`


def _fn(g: Graph, target, *args) -> Node:
    return g.call_function(target, args)


# operator.* rather than torch.*: an operand may be a number (`torch.add(x, 2.0, alpha=dt)`)


def _leaky_relu(g: Graph, a: dict) -> Node:
    # leaky_relu: x if x > 0 else x * slope, forward and backward (at 0 the slope's branch, as aten's)
    x = a["input"]
    return _fn(g, torch.where, _fn(g, torch.gt, x, 0), x, _fn(g, torch.mul, x, a["negative_slope"]))


def _elu(g: Graph, a: dict) -> Node:
    # elu (scale 1): x if x > 0 else alpha * expm1(x), forward and backward
    x = a["input"]
    neg = _fn(g, torch.mul, _fn(g, torch.expm1, x), a["alpha"])
    return _fn(g, torch.where, _fn(g, torch.gt, x, 0), x, neg)


def _celu(g: Graph, a: dict) -> Node:
    # celu: max(0, x) + min(0, alpha * expm1(x / alpha)); x if x > 0 else alpha * expm1(x / alpha)
    x, alpha = a["input"], a["alpha"]
    neg = _fn(g, torch.mul, _fn(g, torch.expm1, _fn(g, torch.div, x, alpha)), alpha)
    return _fn(g, torch.where, _fn(g, torch.gt, x, 0), x, neg)


def _hardtanh(g: Graph, a: dict) -> Node:
    # hardtanh: clamp(x, lo, hi) whose gradient is 1 strictly inside (lo, hi) and 0 at and beyond the bounds
    x, lo, hi = a["input"], a["min_val"], a["max_val"]
    inside = _fn(g, torch.logical_and, _fn(g, torch.gt, x, lo), _fn(g, torch.lt, x, hi))
    clamped = _fn(g, torch.clamp, x, lo, hi)
    return _fn(g, torch.where, inside, x, _fn(g, torch.Tensor.detach, clamped))


def _add_alpha(sign: int) -> Callable[[Graph, dict], Node]:
    def build(g: Graph, a: dict) -> Node:
        scaled = _fn(g, operator.mul, a["other"], a["alpha"])
        return _fn(g, operator.add if sign > 0 else operator.sub, a["input"], scaled)
    return build


def _addcmul(g: Graph, a: dict) -> Node:
    prod = _fn(g, operator.mul, _fn(g, operator.mul, a["tensor1"], a["tensor2"]), a["value"])
    return _fn(g, operator.add, a["input"], prod)


_CLAMP = ScalarForm(("input", "min", "max"), frozenset({"min", "max"}))
_LERP = ScalarForm(("input", "end", "weight"), frozenset({"weight"}))
_ADD, _SUB = (ScalarForm(("input", "other", "alpha"), frozenset({"alpha"}), _add_alpha(s)) for s in (1, -1))
_NOT_INPLACE = (("inplace", False),)

# keyed by (node.op, node.target)
FORMS: dict[tuple[str, object], ScalarForm] = {
    **{("call_function", t): _CLAMP for t in (torch.clamp, torch.clip)},
    **{("call_method", t): _CLAMP for t in ("clamp", "clip")},
    ("call_function", torch.lerp): _LERP,
    ("call_method", "lerp"): _LERP,
    ("call_function", torch.add): _ADD,
    ("call_method", "add"): _ADD,
    ("call_function", torch.sub): _SUB,
    ("call_method", "sub"): _SUB,
    ("call_function", torch.addcmul): ScalarForm(("input", "tensor1", "tensor2", "value"), frozenset({"value"}),
                                                 _addcmul),
    ("call_function", F.leaky_relu): ScalarForm(("input", "negative_slope", "inplace"),
                                                frozenset({"negative_slope"}), _leaky_relu, _NOT_INPLACE),
    ("call_function", F.elu): ScalarForm(("input", "alpha", "inplace"), frozenset({"alpha"}), _elu, _NOT_INPLACE),
    ("call_function", F.celu): ScalarForm(("input", "alpha", "inplace"), frozenset({"alpha"}), _celu, _NOT_INPLACE),
    ("call_function", F.hardtanh): ScalarForm(("input", "min_val", "max_val", "inplace"),
                                              frozenset({"min_val", "max_val"}), _hardtanh, _NOT_INPLACE),
}
DEFAULTS = {"min": None, "max": None, "alpha": 1, "value": 1, "negative_slope": 0.01, "min_val": -1.0,
            "max_val": 1.0, "inplace": False}


def bind(n: Node, args=None, kwargs=None) -> dict | None:
    """`n`'s arguments (or `args` / `kwargs` in their place) by parameter name, defaults filled in, when `n` has
    a :class:`ScalarForm` and its call is one the form covers; else None."""
    form = FORMS.get((n.op, n.target))
    args = n.args if args is None else args
    kwargs = n.kwargs if kwargs is None else kwargs
    if form is None or len(args) > len(form.params) or not set(kwargs) <= set(form.params):
        return None
    bound = dict(zip(form.params, args))
    if set(bound) & set(kwargs):
        return None
    bound.update(kwargs)
    for p in form.params[1:]:
        bound.setdefault(p, DEFAULTS.get(p))
    if any(bound.get(p) != v for p, v in form.fixed):
        return None
    return bound


def liftable(n: Node, leaf_index: int) -> bool:
    """Whether argument leaf `leaf_index` of `n` (in `arg_leaves` order) may carry a per-step number."""
    form = FORMS.get((n.op, n.target))
    if form is None or bind(n) is None:
        return False
    names = [*form.params[:len(n.args)], *n.kwargs]
    return leaf_index < len(names) and names[leaf_index] in form.liftable


def build(g: Graph, n: Node, args: tuple, kwargs: dict) -> Node | None:
    """The equivalent of `n` with a per-step tensor in a number's place (`args` / `kwargs` already substituted),
    or None where `n` itself takes the tensor there (the caller copies it as it is)."""
    form = FORMS.get((n.op, n.target))
    if form is None or form.build is None:
        return None
    bound = bind(n, args, kwargs)
    if bound is None or not any(isinstance(bound[p], Node) for p in form.liftable):
        return None
    return form.build(g, bound)
