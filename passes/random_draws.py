"""Random draws that depend on nothing but shapes move to the top of the graph, in order.

A hand-written stochastic sampler (DDPM, DDIM with eta > 0, Langevin dynamics, SDE integrators) draws its
per-step noise inside the loop: `x = mean(x, model(x, t)) + sigma_i * torch.randn_like(x)`. The draw makes
every step ineligible for a chain (a random op cannot run out of order), so the loop was declined although
its noise does not depend on the state at all: `randn_like(x)` reads only `x`'s shape, dtype and device, which
are the same at every step. Drawn before the loop, the noise of step i is a per-step input like any other,
and the loop a chain (kind "sampler").

The move is exact: torch's generator gives the same numbers in the same order, so it is done only when every
random op of the graph can move (their order among themselves is kept, and no other op draws), and only for
draws whose arguments are literals or the graph's symbolic-size inputs:

- `torch.randn` / `torch.rand` / `torch.randint` / `torch.normal(mean: float, std: float, size)` as they are;
- `torch.randn_like(x)` / `rand_like` / `randint_like` as `torch.randn(x.shape, dtype=, device=)` etc. when
  `x` is contiguous and strided (`empty_like(x).normal_()` and `empty(x.shape).normal_()` fill the same
  elements with the same numbers), every dimension of `x` a literal or a symbolic size the graph takes as an
  input.

A graph with any other random op (dropout in training, `bernoulli`, `multinomial`, in-place `normal_`, a
random op inside an activation-checkpointed body, a draw with `generator=` or a `memory_format`) is left as it
is. Applied in the backend's prepared copy (``pipeline.PREPARE``); where no chain is rewritten, Inductor gets
the original graph. Under Inductor, random ops draw from Inductor's own generator (not eager's numbers, unless
`torch._inductor.config.fallback_random`), as for any compiled model.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._pytree import tree_flatten

from .chains.eligibility import inlinable_body, random_reason
from .functionalize import DEFERRED_META
from .fx_utils import COMPUTE_OPS, node_value

_AS_IS = {torch.randn, torch.rand, torch.randint, torch.normal}
_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand, torch.randint_like: torch.randint}
_LIKE_KWARGS = {"dtype", "device", "layout", "requires_grad", "pin_memory"}  # those the factory takes too


def _symbol_inputs(graph: Graph) -> dict[str, Node]:
    """The graph's symbolic-size placeholders, by their symbol (`s0`, ...)."""
    out = {}
    for n in graph.nodes:
        if n.op == "placeholder" and isinstance(node_value(n), torch.SymInt):
            out[str(node_value(n).node.expr)] = n
    return out


def _size(dims, symbols: dict[str, Node]):
    """A shape (ints and SymInts) as literals and symbolic-size inputs, or None."""
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, torch.SymInt) and is_concrete_int(d):  # specialized: a number in a SymInt
            out.append(int(d))
        elif isinstance(d, torch.SymInt) and str(d.node.expr) in symbols:
            out.append(symbols[str(d.node.expr)])
        else:
            return None
    return tuple(out)


def _hoisted(n: Node, symbols: dict[str, Node]) -> tuple | None:
    """(target, args, kwargs) of the same draw made from literals and size inputs only, or None."""
    if n.op != "call_function" or "generator" in n.kwargs:
        return None
    if n.target in _AS_IS:
        if n.target is torch.normal and any(isinstance(a, Node) for a in n.args[:2]):
            return None  # normal(mean_tensor, std_tensor): reads values
        unmapped = []

        def top(a):  # a size read off a tensor of the loop (`x.size()`, `x.shape[0]`) as literals and inputs
            v = node_value(a)
            sequence = isinstance(v, (tuple, list, torch.Size))
            size = _size(v if sequence else (v,), symbols)
            if size is None:
                unmapped.append(a)
                return a
            return size if sequence else size[0]

        args, kwargs = torch.fx.node.map_arg((n.args, dict(n.kwargs)), top)
        return None if unmapped else (n.target, args, kwargs)
    if n.target in _LIKE:
        like = n.args[0] if n.args else n.kwargs.get("input")
        val = node_value(like) if isinstance(like, Node) else None
        if not isinstance(val, torch.Tensor) or val.layout != torch.strided or not val.is_contiguous():
            return None
        if set(n.kwargs) - _LIKE_KWARGS - {"input"}:
            return None  # memory_format, say
        size = _size(val.shape, symbols)
        if size is None:
            return None
        rest = tuple(n.args[1:])  # randint_like(x, low, high) / (x, high)
        if any(isinstance(a, Node) for a in tree_flatten(rest)[0]):
            return None
        kwargs = {k: v for k, v in n.kwargs.items() if k != "input"}
        kwargs.setdefault("dtype", val.dtype)
        kwargs.setdefault("device", val.device)
        return _LIKE[n.target], (*rest, size), kwargs
    return None


def hoist_random_draws(graph: Graph) -> int:
    """Move every random draw of `graph` to just after its inputs, in order, when all of them can move (see the
    module docstring); returns how many moved (0: the graph is as it was)."""
    randoms, symbols = [], _symbol_inputs(graph)
    for n in graph.nodes:
        if n.op not in COMPUTE_OPS:
            continue
        body = inlinable_body(n)
        if body is not None and any(random_reason(b) for b in body.graph.nodes if b.op in COMPUTE_OPS):
            return 0
        if random_reason(n):
            plan = _hoisted(n, symbols)
            if plan is None:
                return 0
            randoms.append((n, plan))
    if not randoms:
        return 0
    moving = {n for n, _ in randoms}
    # The first node that stays: the graph's first draw may be its first node (stochastic depth's
    # `torch.rand(B, 1)` before the first layer), which is erased below; inserting before it would then put
    # the later draws before a node no longer in the graph, out of the graph's order.
    first = next(n for n in graph.nodes if n.op != "placeholder" and n not in moving)
    for n, (target, args, kwargs) in randoms:
        with graph.inserting_before(first):
            new = graph.call_function(target, args, kwargs)
        new.meta.update(n.meta)
        new.meta[DEFERRED_META] = True  # out of the blocks: the finder does not look for a repeat of draws
        n.replace_all_uses_with(new)
        read = n.all_input_nodes
        graph.erase_node(n)
        for a in read:  # the size reads the draw made (`x.size()`, `x.shape[0]`), now read by nothing
            if not a.users and a.op in COMPUTE_OPS and isinstance(node_value(a), (torch.Size, tuple, int,
                                                                                   torch.SymInt)):
                graph.erase_node(a)
    return len(randoms)


def has_random_draws(graph: Graph) -> bool:
    return any(n.op in COMPUTE_OPS and random_reason(n) for n in graph.nodes)
