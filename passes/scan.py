"""Unroll `torch.ops.higher_order.scan` nodes into their steps, so the chain finder sees them.

Dynamo traces `torch._higher_order_ops.scan(combine_fn, init, xs)` once, as one node calling the body graph
(`scan(body, init, xs, additional_inputs)`: the body takes the carries, one dim-0 slice of each `xs` and the
additional inputs, and returns the new carries then the per-step outputs; `dim` and `reverse` are resolved
before the node). Tracing one step instead of L is what makes the first call of a deep stack cheap
(`pcr_compile.StackedLayers(..., scan=True)` runs its layers this way under torch.compile). The chain finder works on
unrolled graphs, so in the backend's prepared copy such a node becomes L copies of the body, step `i` reading
`torch.select(x, 0, i)` of each `xs`: the form the finder already takes as a stacked per-step input (kind
"layers": the stacked tensor is passed to the chain op as it is). Per-step outputs that the graph reads
become one `torch.stack` of the steps' values. The body's reads of its inputs' sizes (symbolic under dynamic
shapes) are made once, before the steps, from the scan's arguments (`_hoisted_sizes`). When no chain is
rewritten the backend hands Inductor the unrolled copy (below).

Left alone (the node stays, and Inductor compiles it): a scan whose body reads attributes of its own
(`get_attr`), with other arguments than the four above, or whose outputs are used other than by index.
Scans of any length are unrolled, chain or not: when the backend rewrites nothing it hands Inductor the
unrolled copy, because Inductor (torch 2.13, CPU) fails to compile some scans ("scan might be aliasing the
input or the output", `DataDependentOutputException`), and a scan too short to be a chain costs little to
unroll.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from .fx_utils import node_value

SCAN = getattr(getattr(torch.ops, "higher_order", None), "scan", None)


def scan_nodes(graph: Graph) -> list[Node]:
    """The scan nodes of `graph` (none on a torch without the op)."""
    if SCAN is None:
        return []
    return [n for n in graph.nodes if n.op == "call_function" and n.target is SCAN]


def _unrollable(gm: GraphModule, node: Node):
    """(body, init, xs, additional, length, the metadata of one step's slice of each xs) of a scan node this
    pass unrolls, else None."""
    if len(node.args) != 4 or node.kwargs:
        return None
    fn, init, xs, additional = node.args
    if not (isinstance(fn, Node) and fn.op == "get_attr" and isinstance(init, (list, tuple)) and init
            and isinstance(xs, (list, tuple)) and xs and isinstance(additional, (list, tuple))):
        return None
    body = getattr(gm, fn.target, None)
    if not isinstance(body, GraphModule):
        return None
    places = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(places) != len(init) + len(xs) + len(additional):
        return None
    if any(n.op == "get_attr" for n in body.graph.nodes):
        return None
    values = [node_value(x) for x in xs]
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
        return None
    length = values[0].shape[0]
    if not isinstance(length, int) or length < 1 or any(v.shape[0] != length for v in values):
        return None
    for u in node.users:  # read by index only
        if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
            return None
    slice_meta = [places[len(init) + k].meta for k in range(len(xs))]
    return body, list(init), list(xs), list(additional), length, slice_meta


def _hoisted_sizes(graph: Graph, body: GraphModule, carry: list, xs: list, additional: list) -> dict:
    """The body's reads of its inputs' sizes (`aten.sym_size.int(input, d)`, symbolic under dynamic shapes), each
    made once before the loop from the scan's own arguments: a carry keeps its shape through a scan (the init's
    size), and a step's slice of `xs` has the sizes of `xs` after dim 0. Read inside every unrolled step, such a
    size would be read off the chain's state or per-step input, which `vmap` cannot batch (every solve fell
    back to sequential evaluation)."""
    places = [n for n in body.graph.nodes if n.op == "placeholder"]
    sources = {p: (src, shift) for p, src, shift in zip(places, [*carry, *xs, *additional],
                                                        [0] * len(carry) + [1] * len(xs) + [0] * len(additional))}
    hoisted: dict[Node, Node] = {}
    for n in body.graph.nodes:
        if not (n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and len(n.args) == 2
                and n.args[0] in sources and isinstance(n.args[1], int) and isinstance(sources[n.args[0]][0], Node)):
            continue
        src, shift = sources[n.args[0]]
        dim = n.args[1] + shift if n.args[1] >= 0 else n.args[1]
        h = graph.call_function(torch.ops.aten.sym_size.int, (src, dim))
        h.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "val")})
        hoisted[n] = h
    return hoisted


def _inline_step(graph: Graph, body: GraphModule, inputs: list, hoisted: dict | None = None) -> list:
    """Copy `body`'s nodes into `graph` at the insertion point, its placeholders bound to `inputs` and the
    nodes of `hoisted` to their values there; returns the nodes (or values) of its outputs."""
    env: dict[Node, object] = {}
    places = iter(inputs)
    out = None
    hoisted = hoisted or {}
    for n in body.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(places)
        elif n in hoisted:
            env[n] = hoisted[n]
        elif n.op == "output":
            out = n.args[0]
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return list(torch.fx.node.map_arg(out, lambda a: env[a]))


def unroll_scans(graph: Graph) -> int:
    """Unroll every scan node of `graph` that qualifies (module docstring) in place; returns how many."""
    gm = graph.owning_module
    if gm is None or not scan_nodes(graph):
        return 0
    graph.eliminate_dead_code()  # unread per-step outputs (`reverse=True` flips them back even when unread)
    done = 0
    for node in scan_nodes(graph):
        parts = _unrollable(gm, node)
        if parts is None:
            continue
        body, carry, xs, additional, length, slice_meta = parts
        n_c = len(carry)
        read = {u.args[1] for u in node.users}  # output indices read: carries, then per-step outputs
        ys: dict[int, list] = {k: [] for k in read if k >= n_c}
        with graph.inserting_before(node):
            hoisted = _hoisted_sizes(graph, body, carry, xs, additional)
            for i in range(length):
                sliced = []
                for x, meta in zip(xs, slice_meta):
                    s = graph.call_function(torch.select, (x, 0, i))
                    s.meta.update({k: v for k, v in meta.items() if k in ("example_value", "val", "tensor_meta")})
                    sliced.append(s)
                out = _inline_step(graph, body, [*carry, *sliced, *additional], hoisted)
                carry = out[:n_c]
                for k in ys:
                    ys[k].append(out[k])
            outputs = dict(enumerate(carry))
            for k, steps in ys.items():  # scan's stacked per-step outputs
                outputs[k] = graph.call_function(torch.stack, (steps,))
                one = node_value(steps[0]) if isinstance(steps[0], Node) else None
                if isinstance(one, torch.Tensor) and hasattr(one, "fake_mode"):
                    with one.fake_mode:
                        outputs[k].meta["example_value"] = torch.stack([one] * length)
        for u in list(node.users):
            u.replace_all_uses_with(outputs[u.args[1]])
            graph.erase_node(u)
        fn = node.args[0]
        graph.erase_node(node)
        if not fn.users:
            graph.erase_node(fn)
        done += 1
    if done:
        graph.eliminate_dead_code()  # the unread per-step outputs
    return done
