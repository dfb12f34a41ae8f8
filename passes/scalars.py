"""Keep Python floats that Dynamo passes as 0-d tensors as tensors, so that a chain's steps can be batched.

When a float the model reads (a module attribute `self.scale`, a sampler's schedule coefficient) changes
between calls, Dynamo recompiles with it dynamic: the float becomes a 0-d float64 graph input read back with
`.item()` (`mul = tanh * l_self_a.item()`). Inside a chain that `.item()` is a per-step scalar read on the
host, which `torch.func.vmap` cannot batch: every solve of that chain failed and fell back to sequential
evaluation (right values, no parallel solve). This pass points the users of such an `.item()` at the 0-d
tensor itself where that gives the same result, so the chain takes the stacked scalars as a per-step input:

- the `.item()` of a 0-d floating tensor, and Python arithmetic (`+ - * / **`, negation) over such reads and
  Python numbers (`1 - a`), which on 0-d float64 tensors is the same IEEE double arithmetic;
- used as an operand of elementwise `+ - * /` with a floating CPU tensor of at least one dimension: a 0-d
  tensor of the same kind takes part in type promotion as the Python number did (the result keeps the other
  operand's dtype) and CPU kernels read both as the same scalar. (Beside CUDA tensors the read stays: the
  chain's stacked scalars would meet the states on another device under vmap. Such chains still fall back to
  sequential evaluation after a recompile that made their floats dynamic.)

Any other use (a shape, a comparison, a keyword such as `alpha=`, a 0-d or integer other operand) keeps its
`.item()`: the rewrite is all or nothing per value.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from .fx_utils import node_value

_ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg}
# Elementwise ops whose result dtype a 0-d operand of the same kind does not change.
_TENSOR_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                 torch.div, torch.true_divide}
_TENSOR_METHODS = {"add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__sub__", "__rsub__",
                   "__mul__", "__rmul__", "__truediv__", "__rtruediv__"}


def _float_0d(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float64 and v.device.type == "cpu"


def _is_item(n: Node) -> bool:
    return (n.op == "call_method" and n.target == "item" and len(n.args) == 1 and not n.kwargs
            and isinstance(n.args[0], Node) and _float_0d(node_value(n.args[0])))


def _wide_float(a) -> bool:
    v = node_value(a) if isinstance(a, Node) else None
    # On the scalar's device (the CPU, where Dynamo puts them): a chain's stacked per-step scalars are then
    # batched with the states; a CPU scalar beside CUDA states keeps its .item() (vmap's batched CPU tensor
    # is no CPU scalar any more, and would meet the CUDA operand as a tensor on another device).
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and v.device.type == "cpu"


def _tensor_use(user: Node, value: Node) -> bool:
    """Whether `value` (a Python float from a CPU 0-d tensor) may be replaced by that 0-d float64 tensor as an
    operand of `user`."""
    if user.kwargs or len(user.args) != 2 or sum(a is value for a in user.args) != 1:
        return False
    other = user.args[1] if user.args[0] is value else user.args[0]
    if user.op == "call_function" and user.target in _TENSOR_FUNCS:
        return _wide_float(other)
    if user.op == "call_method" and user.target in _TENSOR_METHODS:
        return user.args[0] is not value and _wide_float(other)  # the method's self stays the tensor
    return False


def _scalar_arith(n: Node, values: set[Node]) -> bool:
    """Python arithmetic whose operands are float reads already taken (`values`) or Python numbers."""
    if n.op != "call_function" or n.target not in _ARITH or n.kwargs:
        return False
    ok = all(a in values if isinstance(a, Node) else isinstance(a, (int, float)) and not isinstance(a, bool)
             for a in n.args)
    return ok and any(isinstance(a, Node) for a in n.args)


def tensor_scalars(graph: Graph) -> int:
    """Rewrite the float reads this module describes; returns how many `.item()` reads were removed."""
    items = [n for n in graph.nodes if _is_item(n)]
    if not items:
        return 0
    # The Python float values derived from the reads, in graph order; each becomes a 0-d tensor value.
    values: set[Node] = set(items)
    for n in graph.nodes:
        if n not in values and _scalar_arith(n, values):
            values.add(n)
    # A value may become a tensor only when every user takes a tensor there and (arithmetic) every operand is
    # a value too; drop the others until nothing changes.
    changed = True
    while changed:
        changed = False
        for v in list(values):
            bad = any(u not in values and not _tensor_use(u, v) for u in v.users)
            if not bad and v.op == "call_function":
                bad = any(a not in values for a in v.all_input_nodes)
            if bad:
                values.discard(v)
                changed = True
    done = 0
    for n in items:
        if n not in values:
            continue
        source = n.args[0]
        n.replace_all_uses_with(source)
        graph.erase_node(n)
        done += 1
    for n in graph.nodes:
        if n in values and n.op == "call_function":  # arithmetic now on 0-d float64 tensors
            example = next(node_value(a) for a in n.all_input_nodes)
            n.meta["example_value"] = example.new_empty(())
            n.meta.pop("val", None)
    return done


def has_tensor_scalars(graph: Graph) -> bool:
    """Whether `graph` has a float read this pass could rewrite (the backend's test for copying the graph)."""
    return any(_is_item(n) for n in graph.nodes)
