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

import inspect
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

REQUIRED = inspect.Parameter.empty


class ScalarForm(NamedTuple):
    params: tuple[tuple[str, object], ...]  # the op's (parameter, default) in positional order, tensor first
    liftable: frozenset[str]  # those that may carry a per-step number
    # (graph, bound arguments by name) -> the equivalent node; None where the op takes a 0-d tensor itself
    build: Callable[[Graph, dict], Node] | None = None
    fixed: tuple[tuple[str, object], ...] = ()  # (parameter, the only value accepted): `inplace=False`


def _fn(g: Graph, target, *args) -> Node:
    return g.call_function(target, args)


def _signature(fn) -> tuple[tuple[str, object], ...]:
    """(parameter, default) of a Python function (`torch.nn.functional`'s), from its own signature."""
    return tuple((p.name, p.default) for p in inspect.signature(fn).parameters.values())


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


def _softplus(g: Graph, a: dict) -> Node:
    # softplus: x if beta * x > threshold else log1p(exp(beta * x)) / beta, forward and backward. The exp
    # branch reads 0 where the linear one is taken: exp's overflow there would make its gradient 0 * inf
    x, beta, threshold = a["input"], a["beta"], a["threshold"]
    bx = _fn(g, operator.mul, x, beta)
    linear = _fn(g, torch.gt, bx, threshold)
    safe = _fn(g, torch.where, linear, 0.0, bx)
    smooth = _fn(g, operator.truediv, _fn(g, torch.log1p, _fn(g, torch.exp, safe)), beta)
    return _fn(g, torch.where, linear, x, smooth)


def _softshrink(g: Graph, a: dict) -> Node:
    # softshrink: x - l above l, x + l below -l, else 0 (x * 0: a NaN stays NaN, as aten's)
    x, lambd = a["input"], a["lambd"]
    inner = _fn(g, torch.where, _fn(g, torch.lt, x, _fn(g, operator.neg, lambd)), _fn(g, operator.add, x, lambd),
                _fn(g, operator.mul, x, 0.0))
    return _fn(g, torch.where, _fn(g, torch.gt, x, lambd), _fn(g, operator.sub, x, lambd), inner)


def _hardshrink(g: Graph, a: dict) -> Node:
    # hardshrink: 0 on [-l, l], else x (a NaN stays NaN); gradient 0 on [-l, l], bounds included
    x, lambd = a["input"], a["lambd"]
    inside = _fn(g, torch.logical_and, _fn(g, torch.ge, x, _fn(g, operator.neg, lambd)), _fn(g, torch.le, x, lambd))
    return _fn(g, torch.where, inside, 0.0, x)


def _threshold(g: Graph, a: dict) -> Node:
    # threshold: value where x <= threshold, else x (a NaN stays NaN); gradient 0 at and below the threshold
    x = a["input"]
    return _fn(g, torch.where, _fn(g, torch.le, x, a["threshold"]), a["value"], x)


def _masked_fill(g: Graph, a: dict) -> Node:
    # masked_fill with a per-step 0-d value: vmap has no batching rule for a batched value (it loops)
    return _fn(g, torch.where, a["mask"], a["value"], a["input"])


def _rrelu_eval(g: Graph, a: dict) -> Node:
    # rrelu outside training: leaky_relu with the slope (lower + upper) / 2, as aten's
    slope = _fn(g, operator.truediv, _fn(g, operator.add, a["lower"], a["upper"]), 2)
    return _leaky_relu(g, {"input": a["input"], "negative_slope": slope})


def _normalize(g: Graph, a: dict) -> Node:
    # F.normalize: x / max(||x||_p, eps) over `dim`, as torch.nn.functional spells it
    x = a["input"]
    norm = g.call_method("norm", (x, a["p"], a["dim"]), {"keepdim": True})
    denom = g.call_method("expand_as", (g.call_method("clamp_min", (norm, a["eps"])), x))
    return _fn(g, operator.truediv, x, denom)


def _scaled(g: Graph, v, factor) -> Node | None:
    # v * factor where factor may be a per-step 0-d tensor; a zero factor drops v (NaN included), as BLAS does
    if not isinstance(factor, Node):
        return v if factor == 1 else None if factor == 0 else _fn(g, operator.mul, v, factor)
    return _fn(g, torch.where, _fn(g, torch.ne, factor, 0), _fn(g, operator.mul, v, factor), 0.0)


def _addmm_like(names: tuple[str, str], product: Callable[[Graph, Node, Node], Node]) -> Callable[[Graph, dict], Node]:
    # addmm / addmv / baddbmm / addbmm: beta * input + alpha * product(a, b), the product's shape throughout
    def build(g: Graph, a: dict) -> Node:
        prod = product(g, *(a[k] for k in names))
        scaled_prod = _scaled(g, prod, a["alpha"])
        scaled_in = _scaled(g, a["input"], a["beta"])
        if scaled_prod is None:  # alpha == 0: the product's shape, none of its values
            scaled_prod = _fn(g, torch.zeros_like, prod)
        return scaled_prod if scaled_in is None else _fn(g, operator.add, scaled_in, scaled_prod)
    return build


# operator.* rather than torch.*: an operand may be a number (`torch.add(x, 2.0, alpha=dt)`)
def _add_alpha(sign: int) -> Callable[[Graph, dict], Node]:
    def build(g: Graph, a: dict) -> Node:
        scaled = _fn(g, operator.mul, a["other"], a["alpha"])
        return _fn(g, operator.add if sign > 0 else operator.sub, a["input"], scaled)
    return build


def _addcmul(g: Graph, a: dict) -> Node:
    prod = _fn(g, operator.mul, _fn(g, operator.mul, a["tensor1"], a["tensor2"]), a["value"])
    return _fn(g, operator.add, a["input"], prod)


# Builtins (no Python signature to read): their parameters and defaults spelled out.
_CLAMP = ScalarForm((("input", REQUIRED), ("min", None), ("max", None)), frozenset({"min", "max"}))
# clamp_min / clamp_max take a tensor bound themselves (their .Tensor overloads: the same values and gradients)
_CLAMP_MIN = ScalarForm((("input", REQUIRED), ("min", REQUIRED)), frozenset({"min"}))
_CLAMP_MAX = ScalarForm((("input", REQUIRED), ("max", REQUIRED)), frozenset({"max"}))
_LERP = ScalarForm((("input", REQUIRED), ("end", REQUIRED), ("weight", REQUIRED)), frozenset({"weight"}))
_ADD, _SUB = (ScalarForm((("input", REQUIRED), ("other", REQUIRED), ("alpha", 1)), frozenset({"alpha"}),
                         _add_alpha(s)) for s in (1, -1))
_ADDCMUL = ScalarForm((("input", REQUIRED), ("tensor1", REQUIRED), ("tensor2", REQUIRED), ("value", 1)),
                      frozenset({"value"}), _addcmul)


_SOFTPLUS = ScalarForm((("input", REQUIRED), ("beta", 1.0), ("threshold", 20.0)), frozenset({"beta", "threshold"}),
                       _softplus)
_SOFTSHRINK = ScalarForm((("input", REQUIRED), ("lambd", 0.5)), frozenset({"lambd"}), _softshrink)
_HARDSHRINK = ScalarForm((("input", REQUIRED), ("lambd", 0.5)), frozenset({"lambd"}), _hardshrink)
_THRESHOLD = ScalarForm((("input", REQUIRED), ("threshold", REQUIRED), ("value", REQUIRED)),
                        frozenset({"threshold", "value"}), _threshold)
_MASKED_FILL = ScalarForm((("input", REQUIRED), ("mask", REQUIRED), ("value", REQUIRED)), frozenset({"value"}),
                          _masked_fill)


def _addmm_form(second: str, third: str, op, summed: bool = False) -> ScalarForm:
    """addmm's family: `op(second, third)`, summed over its first dimension for addbmm."""
    def product(g: Graph, m1: Node, m2: Node) -> Node:
        out = _fn(g, op, m1, m2)
        return _fn(g, torch.sum, out, 0) if summed else out
    return ScalarForm((("input", REQUIRED), (second, REQUIRED), (third, REQUIRED), ("beta", 1), ("alpha", 1)),
                      frozenset({"beta", "alpha"}), _addmm_like((second, third), product))


_ADDMM = _addmm_form("mat1", "mat2", torch.mm)
_ADDMV = _addmm_form("mat", "vec", torch.mv)
_BADDBMM = _addmm_form("batch1", "batch2", torch.bmm)
_ADDBMM = _addmm_form("batch1", "batch2", torch.bmm, summed=True)


def _eval_dropout(g: Graph, a: dict) -> Node:
    # dropout outside training is its input, whatever its rate (a per-layer rate in eval mode)
    return a["input"]


def _functional(fn, liftable: set[str], build) -> ScalarForm:
    return ScalarForm(_signature(fn), frozenset(liftable), build, fixed=(("inplace", False),))


# keyed by (node.op, node.target)
FORMS: dict[tuple[str, object], ScalarForm] = {
    **{("call_function", t): _CLAMP for t in (torch.clamp, torch.clip)},
    **{("call_method", t): _CLAMP for t in ("clamp", "clip")},
    ("call_function", torch.clamp_min): _CLAMP_MIN,
    ("call_method", "clamp_min"): _CLAMP_MIN,
    ("call_function", torch.clamp_max): _CLAMP_MAX,
    ("call_method", "clamp_max"): _CLAMP_MAX,
    ("call_function", torch.lerp): _LERP,
    ("call_method", "lerp"): _LERP,
    ("call_function", torch.add): _ADD,
    ("call_method", "add"): _ADD,
    ("call_function", torch.sub): _SUB,
    ("call_method", "sub"): _SUB,
    ("call_function", torch.addcmul): _ADDCMUL,
    ("call_function", F.leaky_relu): _functional(F.leaky_relu, {"negative_slope"}, _leaky_relu),
    ("call_function", F.elu): _functional(F.elu, {"alpha"}, _elu),
    ("call_function", F.celu): _functional(F.celu, {"alpha"}, _celu),
    ("call_function", F.hardtanh): _functional(F.hardtanh, {"min_val", "max_val"}, _hardtanh),
    ("call_function", F.softplus): _SOFTPLUS,
    ("call_function", F.softshrink): _SOFTSHRINK,
    ("call_function", torch.hardshrink): _HARDSHRINK,
    ("call_method", "hardshrink"): _HARDSHRINK,
    ("call_function", torch.threshold): _THRESHOLD,
    ("call_function", torch.masked_fill): _MASKED_FILL,
    ("call_method", "masked_fill"): _MASKED_FILL,
    ("call_function", F.rrelu): ScalarForm(_signature(F.rrelu), frozenset({"lower", "upper"}), _rrelu_eval,
                                           fixed=(("training", False), ("inplace", False))),
    ("call_function", F.normalize): ScalarForm(_signature(F.normalize), frozenset({"eps"}), _normalize,
                                               fixed=(("out", None),)),
    **{("call_function", t): f for t, f in ((torch.addmm, _ADDMM), (torch.addmv, _ADDMV),
                                            (torch.baddbmm, _BADDBMM), (torch.addbmm, _ADDBMM))},
    **{("call_method", t): f for t, f in (("addmm", _ADDMM), ("addmv", _ADDMV), ("baddbmm", _BADDBMM),
                                          ("addbmm", _ADDBMM))},
    ("call_function", F.dropout): ScalarForm(_signature(F.dropout), frozenset({"p"}), _eval_dropout,
                                             fixed=(("training", False), ("inplace", False))),
}


def bind(n: Node, args=None, kwargs=None) -> dict | None:
    """`n`'s arguments (or `args` / `kwargs` in their place) by parameter name, defaults filled in, when `n` has
    a :class:`ScalarForm` and its call is one the form covers; else None."""
    form = FORMS.get((n.op, n.target))
    args = n.args if args is None else args
    kwargs = n.kwargs if kwargs is None else kwargs
    if form is None:
        return None
    names = [p for p, _ in form.params]
    if len(args) > len(names) or not set(kwargs) <= set(names):
        return None
    bound = dict(zip(names, args))
    if set(bound) & set(kwargs):
        return None
    bound.update(kwargs)
    for p, default in form.params:
        bound.setdefault(p, default)
    if any(v is REQUIRED for v in bound.values()) or any(bound[p] != v for p, v in form.fixed):
        return None
    return bound


def liftable(n: Node, leaf_index: int) -> bool:
    """Whether argument leaf `leaf_index` of `n` (in `arg_leaves` order) may carry a per-step number."""
    form = FORMS.get((n.op, n.target))
    if form is None or bind(n) is None:
        return False
    names = [*(p for p, _ in form.params[:len(n.args)]), *n.kwargs]
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
