"""`torch.no_grad()` regions inside the graph become `detach`es of the values they hand on.

A block that computes part of its step without gradients (a gate, a routing decision, a target computed
`with torch.no_grad():`) reaches Dynamo's graph as `_set_grad_enabled(False)`, the region's ops, then
`_set_grad_enabled(True)`. The markers are side effects, so the chain finder declined every such block. Their
meaning is exact and local: each value computed in the region does not require grad. Computing the region's
ops with gradients on and detaching each value that a node after the region reads gives the same values and
the same gradients (none through the region), and leaves pure ops the finder can take.

Only regions whose ops are plain functions and methods without in-place mutation are rewritten (`p.add_(...)`
under `no_grad` is an optimizer's update, not a value: it would need grad mode off), and only where the region
is a `False` marker followed by a `True` one with no other marker between. Applied in the backend's prepared
copy (``pipeline.PREPARE``); where no chain is rewritten, Inductor gets the original graph.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten

from .fx_utils import mutates_in_place, node_value


def _grad_marker(n: Node) -> bool | None:
    """The grad mode `n` sets (`torch._C._set_grad_enabled(mode)`), or None when it is no such marker."""
    if n.op == "call_function" and n.target is torch._C._set_grad_enabled and len(n.args) == 1 and not n.kwargs \
            and isinstance(n.args[0], bool):
        return n.args[0]
    return None


def opens_no_grad(n: Node) -> bool:
    """Whether `n` is a `_set_grad_enabled(False)` marker (the start of a region this pass may rewrite)."""
    return _grad_marker(n) is False


def _rewritable(region: list[Node]) -> bool:
    for n in region:
        if n.op not in ("call_function", "call_method") or mutates_in_place(n) or \
                (n.op == "call_method" and n.target == "requires_grad_"):
            return False
    inside = set(region)
    for n in region:  # every value read after the region must be a tensor (detached) or hold no tensor
        if any(u not in inside for u in n.users):
            v = node_value(n)
            if not isinstance(v, torch.Tensor) and any(isinstance(x, torch.Tensor)
                                                       for x in tree_flatten(v)[0]):
                return False
    return True


def detach_no_grad_regions(graph: Graph) -> int:
    """Rewrite the `no_grad` regions of `graph` as described in the module docstring; returns how many."""
    nodes = list(graph.nodes)
    done = 0
    i = 0
    while i < len(nodes):
        if _grad_marker(nodes[i]) is not False:
            i += 1
            continue
        j = next((k for k in range(i + 1, len(nodes)) if _grad_marker(nodes[k]) is not None), None)
        if j is None or _grad_marker(nodes[j]) is not True:
            i = j if j is not None else len(nodes)
            continue
        start, end, region = nodes[i], nodes[j], nodes[i + 1:j]
        if start.users or end.users or not _rewritable(region):
            i = j + 1
            continue
        inside = set(region)
        for n in region:
            outside = [u for u in n.users if u not in inside]
            if not outside or not isinstance(node_value(n), torch.Tensor):
                continue
            with graph.inserting_before(end):
                d = graph.call_function(torch.Tensor.detach, (n,))
            d.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "val", "tensor_meta",
                                                                     "stack_trace", "nn_module_stack")})
            for u in outside:
                u.replace_input_with(n, d)
        graph.erase_node(start)
        graph.erase_node(end)
        done += 1
        i = j + 1
    return done
