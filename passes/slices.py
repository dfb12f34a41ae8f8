"""Unit slices by a per-step number, as an index the finder can lift: `x[:, t:t + 1]` -> `x[:, t, None]`.

A loop over time that keeps the time dimension reads its step's input as `u[:, t:t + 1]`; Dynamo bakes each
step's `t` into the slice, a literal the finder cannot lift to a per-step input (a slice takes no tensor), so
the loop was declined. An int index lifts (`getitem` takes a 0-d tensor there), and `x[:, t, None]` is the same
view as `x[:, t:t + 1]` (the same values, shape and storage) whenever `0 <= t < x.shape[dim]`. Only basic
indexing is rewritten (ints, slices and None; no Ellipsis, tensor or list index), and only unit slices with a
static bound inside the dimension; everything else stays as it is.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from .fx_utils import node_value


def _unit_index(s: slice, size) -> bool:
    return (type(s.start) is int and type(s.stop) is int and s.step in (None, 1) and s.stop == s.start + 1
            and isinstance(size, int) and 0 <= s.start < size)


def _rewritten(index: tuple, shape) -> tuple | None:
    out, dim, changed = [], 0, False
    for e in index:
        if e is None:
            out.append(e)
        elif type(e) is int:
            out.append(e)
            dim += 1
        elif isinstance(e, slice):
            if dim < len(shape) and _unit_index(e, shape[dim]):
                out += [e.start, None]
                changed = True
            else:
                out.append(e)
            dim += 1
        else:  # Ellipsis, a tensor, a list, a bool: not plain basic indexing
            return None
    return tuple(out) if changed and dim <= len(shape) else None


def _new_index(n: Node) -> tuple | None:
    """The index `n` gets, when `n` is a getitem with a unit slice to rewrite; else None."""
    is_getitem = (n.op == "call_function" and n.target is operator.getitem) or \
        (n.op == "call_method" and n.target == "__getitem__")
    if not is_getitem or len(n.args) != 2 or n.kwargs or not isinstance(n.args[0], Node):
        return None
    src = node_value(n.args[0])
    if not isinstance(src, torch.Tensor):
        return None
    return _rewritten(n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],), tuple(src.shape))


def rewritable_slice(n: Node) -> bool:
    """Whether :func:`unit_slices_as_indices` would rewrite `n`."""
    return _new_index(n) is not None


def unit_slices_as_indices(graph: Graph) -> int:
    """Rewrite `getitem(x, (..., slice(t, t + 1), ...))` as `getitem(x, (..., t, None, ...))` (module docstring);
    returns how many nodes changed."""
    changed = 0
    for n in graph.nodes:
        new = _new_index(n)
        if new is not None:
            n.args = (n.args[0], new)
            changed += 1
    return changed
