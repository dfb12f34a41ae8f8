"""Step 1 of the finder: a structural signature per compute node (op, target, argument structure with nodes and
numbers abstracted, output shape and dtype); equal signatures in a repeating sequence are candidate steps."""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.utils._pytree import tree_flatten

from ..fx_utils import node_value


def _value_sig(v) -> object:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(str(s) for s in v.shape), str(v.dtype), str(v.device))
    if isinstance(v, (list, tuple)):
        return tuple(_value_sig(x) for x in v)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("S", type(v).__name__)
    return type(v).__name__


def _leaf_sig(x) -> object:
    if isinstance(x, Node):
        return "N"
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, (int, float)):
        return type(x).__name__  # numbers may differ per step (lifted later)
    if isinstance(x, slice):  # `x[:, t:t + 1]`: the bounds are numbers too (validation says if they can lift)
        return ("slice", _leaf_sig(x.start), _leaf_sig(x.stop), _leaf_sig(x.step))
    return repr(x)


def node_signature(n: Node) -> tuple:
    leaves, spec = tree_flatten((n.args, n.kwargs))
    val = node_value(n)
    return (n.op, n.target if n.op != "call_module" else "module", str(spec), tuple(_leaf_sig(x) for x in leaves),
            _value_sig(val))
