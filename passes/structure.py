"""Structure of a chain's one-step template, for the solver's cheap paths. Analysis only.

A *linear-pointwise* step is `z -> act(z @ W^T + b)` or the residual form `z -> z + act(z @ W^T + b)`,
where `act` is any chain of elementwise ops (tanh, gelu, a scalar multiply, ...). Its Jacobian is
`diag(act'(a)) W` (+ I): the exact diagonal costs one elementwise derivative, which makes the "diagonal"
(quasi-Newton) strategy cheap, and the fused Newton solve (`pcr_compile/solver/fused.py`) apply when `act`
is a single known activation.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .fx_utils import bound_arguments

LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
# Elementwise ops of one tensor (other arguments constants), with the fused kernels' names where they exist.
POINTWISE = {
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu", F.relu: "relu", torch._C._nn.gelu: "gelu",
    F.gelu: "gelu", F.silu: "silu", torch._C._nn.silu: "silu", F.sigmoid: "sigmoid", F.tanh: "tanh",
    torch.sin: None, torch.cos: None, torch.exp: None, F.softplus: None, F.elu: None, F.leaky_relu: None,
    F.hardtanh: None, torch.erf: None, operator.mul: None, operator.truediv: None, operator.add: None,
    operator.sub: None, operator.neg: None, torch.mul: None,
}
POINTWISE_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu", "mul": None, "div": None}
# Arguments besides the input that a named activation may carry and still be the fused kernels' function:
# `inplace` (any value: the graph is functional by now) and `approximate="none"` (the erf GELU). Any other
# argument (`approximate="tanh"`, a softplus beta, ...) changes the function: such a call is still a
# pointwise op (its exact derivative comes from the copied node), but not a named activation.
NEUTRAL_ARGUMENTS = {"inplace": None, "approximate": "none"}


@dataclass(frozen=True)
class LinearPointwise:
    weight: int  # index of W among the template's per-step inputs
    bias: int | None  # index of b among the per-step inputs, or None
    residual: bool
    activation: str | None  # the single named activation, for the fused kernels; None otherwise
    pointwise: GraphModule  # a -> act(a), the elementwise part


def _named_activation(n: Node) -> str | None:
    """The fused kernels' name of `n`'s function, or None when it has none or its arguments change it."""
    if n.op == "call_method":
        return POINTWISE_METHODS.get(n.target) if len(n.args) == 1 and not n.kwargs else None
    name = POINTWISE.get(n.target)
    if name is None:
        return None
    extra = dict(n.kwargs)
    if len(n.args) > 1:
        bound = bound_arguments(n)
        if bound is None:  # a builtin without a Python signature (torch._C._nn.gelu, say): unknown meaning
            return None
        params = list(bound.signature.parameters)
        extra.update({k: bound.arguments[k] for k in params[1:len(n.args)]})
    for key, value in extra.items():
        if key not in NEUTRAL_ARGUMENTS or (NEUTRAL_ARGUMENTS[key] is not None and value != NEUTRAL_ARGUMENTS[key]):
            return None
    return name


def _only_node_arg(n: Node) -> Node | None:
    nodes = [a for a in n.all_input_nodes]
    return nodes[0] if len(nodes) == 1 else None


def linear_pointwise(template: GraphModule, n_state: int, n_per_step: int) -> LinearPointwise | None:
    """Recognise a linear-pointwise one-step template (single state, per-step W and b), else None."""
    if n_state != 1:
        return None
    nodes = list(template.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    state, per_step = placeholders[0], placeholders[1: 1 + n_per_step]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    out = next(n for n in nodes if n.op == "output").args[0]
    if len(out) != 1 or not body:
        return None
    lin = body[0]
    if lin.target not in LINEAR_TARGETS or lin.args[0] is not state or lin.kwargs:
        return None
    w_arg = lin.args[1]
    b_arg = lin.args[2] if len(lin.args) > 2 else None
    if w_arg not in per_step or (b_arg is not None and b_arg not in per_step):
        return None
    rest, residual = body[1:], False
    last = out[0]
    if rest and last is rest[-1] and last.target in (operator.add, torch.add) and len(last.args) == 2 \
            and state in last.args and not last.kwargs:
        residual = True
        inner = last.args[1] if last.args[0] is state else last.args[0]
        rest = rest[:-1]
        if rest and inner is not rest[-1]:
            return None
        if not rest and inner is not lin:
            return None
    elif rest and last is not rest[-1]:
        return None
    elif not rest and last is not lin:
        return None
    prev, names = lin, []
    for n in rest:  # a straight line of elementwise ops, each reading only the previous one
        known = (n.op == "call_function" and n.target in POINTWISE) or \
                (n.op == "call_method" and n.target in POINTWISE_METHODS)
        if not known or _only_node_arg(n) is not prev or len(n.users) != 1:
            return None
        names.append(_named_activation(n))
        prev = n
    g = Graph()
    a = g.placeholder("a")
    env = {lin: a}
    for n in rest:
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(env[rest[-1]] if rest else a)
    pointwise = GraphModule(torch.nn.Module(), g, class_name="Pointwise")
    activation = "identity" if not rest else (names[0] if len(names) == 1 else None)
    return LinearPointwise(weight=per_step.index(w_arg), bias=None if b_arg is None else per_step.index(b_arg),
                           residual=residual, activation=activation, pointwise=pointwise)
