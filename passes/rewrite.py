"""Rewriting chosen chains into chain-op calls. Rewriting never searches: it takes `ChainMatch`es.

For each chain: build the one-step template (an FX graph of block 0 with every outside reference turned
into a placeholder), register its op, insert one call of the op after the chain, route the users of the
last step's state to the op's results, and delete the chain's nodes. All checks run before the first
mutation; afterwards the backend eliminates dead code, lints and recompiles once (``fx_utils.cleanup``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import vmap_compat
from .chains import ChainMatch, scalar_forms
from .fx_utils import node_value

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    gm: GraphModule
    key: str  # hash of the template's code and input layout
    n_state: int
    n_per_step: int
    n_consts: int
    n_invariants: int
    n_syms: int


def build_template(match: ChainMatch) -> Template:
    """One step of the chain as a GraphModule: (*states, *per_step, *consts, *invariants, *syms) -> tuple(states)."""
    g = Graph()
    states = [g.placeholder(f"state_{i}") for i in range(len(match.initial))]
    n_groups = len(match.per_step)
    per_step = [g.placeholder(f"step_{i}") for i in range(n_groups + len(match.sliced))]
    sliced_at = {j: per_step[n_groups + i] for i, (j, _, _) in enumerate(match.sliced)}
    n_lift = len(match.lifted)
    lifted = [g.placeholder(f"const_{i}") for i in range(n_lift)]
    folded = [g.placeholder(f"const_{n_lift + i}") for i in range(len(match.folded))]
    invariants = [g.placeholder(f"shared_{i}") for i in range(len(match.invariants))]
    syms = [g.placeholder(f"size_{i}") for i in range(len(match.sym_invariants))]
    # The autocast contexts the steps ran in (a region around the chain, or around the compiled call): the
    # template enters them itself, so every evaluation of a step (solve, Jacobians, adjoint, sequential
    # fallback) casts as eager does, whatever autocast state the chain op is called in.
    # Their weight-cast cache is off: a cast cached inside the solve's vmap / jacrev would outlive the
    # template's call in a region opened around the compiled call (the cache is cleared when the outermost
    # region closes); casting again is the same value.
    contexts = [g.call_function(torch.amp._enter_autocast, _uncached(vals)) for vals in match.autocast]
    # Inlined bodies (activation checkpointing): block 0's, copied into the template's module, with the
    # same vmap-friendly substitutions; the checkpoint itself is dropped (a plain call of the body).
    root = torch.nn.Module()
    owner = match.first.graph.owning_module
    body_names = []
    for i, name in enumerate(match.submodules):
        body = copy.deepcopy(owner.get_submodule(name))
        if vmap_compat.substitute(body.graph):
            body.recompile()
        root.add_module(f"body_{i}", body)
        body_names.append(f"body_{i}")
    env: dict[int, Node] = {}
    # Where each kind of argument reference points in the template ("const" keeps the literal).
    sources = {"internal": env, "state": states, "per_step": per_step, "invariant": invariants, "symint": syms,
               "lifted": lifted, "submodule": body_names}
    for j, node in enumerate(match.blocks[0]):
        if j in match.folded:
            env[j] = folded[match.folded.index(j)]
            continue
        if j in sliced_at:  # step l of a tensor the model holds stacked: a per-step input
            env[j] = sliced_at[j]
            continue
        leaves, spec = tree_flatten((node.args, node.kwargs))
        new_leaves = [x if ref.kind == "const" else sources[ref.kind][ref.index]
                      for ref, x in zip(match.arg_refs[j], leaves)]
        args, kwargs = tree_unflatten(new_leaves, spec)
        if match.arg_refs[j] and match.arg_refs[j][0].kind == "submodule":
            env[j] = g.create_node("call_module", args[0], tuple(args[1:]), {}, name=f"n{j}")
        elif any(r.kind == "lifted" for r in match.arg_refs[j]) and \
                (form := scalar_forms.build(g, node, args, kwargs)) is not None:
            env[j] = form  # a per-step number where the op takes none: its equivalent (chains/scalar_forms.py)
        else:
            if node.target is torch.amp._enter_autocast:  # a region the step opens itself: uncached too
                args = _uncached(args)
            env[j] = g.create_node(node.op, node.target, args, kwargs, name=f"n{j}")
    for ctx in reversed(contexts):
        g.call_function(torch.amp._exit_autocast, (ctx,))
    g.output(tuple(env[q] for q in match.state_positions))
    gm = GraphModule(root, g, class_name="ChainStep")
    gm.graph.eliminate_dead_code()  # (call_module purity checks need the owning module)
    vmap_compat.substitute(gm.graph)  # the template runs under vmap
    gm.recompile()
    layout = (len(states), len(per_step), n_lift + len(folded), len(invariants), len(syms))
    code = gm.code + "".join(getattr(root, b).code for b in body_names)
    key = hashlib.sha1((code + repr(layout)).encode()).hexdigest()[:16]
    return Template(gm, key, *layout)


def _uncached(vals) -> tuple:
    """`torch.amp._enter_autocast`'s arguments (device_type, dtype, enabled, cache_enabled) with the cache off."""
    vals = tuple(vals) + (None,) * (4 - len(vals))
    return (*vals[:3], False, *vals[4:])


def _rows(n: Node) -> int | None:
    v = node_value(n)
    return int(v.shape[0]) if isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], int) else None


def folded_values(match: ChainMatch) -> list[torch.Tensor]:
    """Per-step values of the folded constant nodes, each stacked (L, ...)."""
    out = []
    for j in match.folded:
        vals = []
        for blk in match.blocks:
            n = blk[j]
            vals.append(n.target(*n.args, **n.kwargs))
        out.append(torch.stack(vals))
    return out


def lifted_values(match: ChainMatch, device) -> list[torch.Tensor]:
    """Per-step lifted Python scalars as tensors (L,): float64 for floats (0-d tensors do not change the
    result dtype of an op with a dimensioned tensor), int64 for ints."""
    out = []
    for values in match.lifted:
        dtype = torch.float64 if any(isinstance(v, float) for v in values) else torch.int64
        out.append(torch.tensor(values, dtype=dtype, device=device))
    return out


_DETACH = {torch.detach, torch.Tensor.detach, torch.ops.aten.detach.default}


def _carries_gradient(n: Node) -> bool:
    """Whether gradients can flow through `n`'s value: not a `detach`, and some floating tensor in it (integer
    and boolean tensors, sizes and other Python values never require grad)."""
    if (n.op == "call_method" and n.target == "detach") or (n.op == "call_function" and n.target in _DETACH):
        return False
    if "example_value" not in n.meta and "val" not in n.meta:
        return True  # a node a pass made without an example value: assume it differentiates
    return any(isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
               for v in tree_flatten(node_value(n))[0])


def undifferentiated_inputs(match: ChainMatch) -> tuple[set[int], set[int], set[int]]:
    """(per-step groups, stacked slices, invariants) of `match` that no carried state of a step reaches along a
    path autograd could differentiate: every path from them to the states passes a `detach` (a gate computed
    `.detach()`-ed) or a value with no floating tensor (a comparison). Eager leaves their gradients None; the
    chain op would return zeros. Conservative: any other op counts as differentiable."""
    reach: dict[int, set] = {}
    sliced_at = {j: i for i, (j, _, _) in enumerate(match.sliced)}
    for j, node in enumerate(match.blocks[0]):
        if j in match.folded:
            reach[j] = set()
            continue
        if j in sliced_at:
            reach[j] = {("sliced", sliced_at[j])}
            continue
        got: set = set()
        for ref in match.arg_refs[j]:
            if ref.kind == "internal":
                got |= reach[ref.index]
            elif ref.kind in ("per_step", "invariant"):
                got.add((ref.kind, ref.index))
        reach[j] = got if _carries_gradient(node) else set()
    used = set().union(*(reach[q] for q in match.state_positions))
    unused = [{i for i in range(n) if (kind, i) not in used}
              for kind, n in (("per_step", len(match.per_step)), ("sliced", len(match.sliced)),
                              ("invariant", len(match.invariants)))]
    return unused[0], unused[1], unused[2]


def remap_match(match: ChainMatch, replaced: dict[Node, Node]) -> ChainMatch:
    """`match` with the outside nodes it names (initial states, per-step inputs, invariants, symbolic sizes,
    stacked sources) replaced per `replaced` (`rewrite_chain`'s record of an earlier rewrite in the graph)."""
    if not replaced:
        return match

    def sub(n):
        return replaced.get(n, n)

    return dataclasses.replace(
        match, initial=tuple(map(sub, match.initial)), per_step=tuple(tuple(map(sub, g)) for g in match.per_step),
        invariants=tuple(map(sub, match.invariants)), sym_invariants=tuple(map(sub, match.sym_invariants)),
        sliced=tuple((j, sub(src), start) for j, src, start in match.sliced))


def groups(xs: list, sizes: list[int]):
    """`xs` cut into consecutive groups of `sizes[k]` items (the flat form of `rewrite_chain`'s group stack)."""
    at = 0
    for n in sizes:
        yield xs[at:at + n]
        at += n


def stack_each(xs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """`torch.stack` of each group of `xs` (`groups`): `rewrite_chain`'s default group stack (the backend
    passes its op that does the same out of Inductor's sight, ``pcr_compile.runtime.ops.stack_groups``)."""
    return [torch.stack(group) for group in groups(xs, sizes)]


def rewrite_chain(gm: GraphModule, match: ChainMatch, op, call_args, *, tol: float, max_iters: int, jacobian: str,
                  window: int, kernels: str, save_trajectory: bool, const_prefix: str, adaptive: bool = False,
                  stack_groups=stack_each, sampler_jacobian: str = "auto", replaced: dict | None = None) -> Node:
    """Replace `match` in `gm.graph` by one call of `op`; returns the op node. Does not recompile.

    `replaced`: one dict shared by the rewrites of one graph's chains, {node read outside its chain: the node
    now read instead}. Every match was found before the first rewrite, so a later chain may name nodes an
    earlier rewrite replaced (its initial state or per-step inputs may be that chain's outputs or exposed
    values, as a UNet's up path reads its down path's skips): the match is brought up to date from it first
    (`remap_match`), and this rewrite's reroutes are added to it.

    `call_args(**kw)` orders the op's arguments (the op's own argument list, ``pcr_compile.runtime.ops``); the
    per-step groups enter stacked, all of them by one `stack_groups(flat, sizes) -> [stacked group, ...]` call
    in the graph, so the graph's autograd differentiates the stack and each layer's gradient is a view of one
    stacked gradient.

    The op returns the last step's states, then (with `save_trajectory`, forced on when the chain has
    exposed values) every step's states stacked `(L, *state)`. Exposed states of earlier steps are read
    from those; other exposed nodes are recomputed after the call from the states before their step (a
    copy of their block's nodes, outside the op, where autograd and Inductor see them as usual).
    """
    if replaced:
        match = remap_match(match, replaced)
    graph = gm.graph
    outputs = match.outputs
    device = match.state_values()[0].device
    consts = lifted_values(match, device) + [v.to(device) for v in folded_values(match)]
    L = match.length
    n_state = len(outputs)
    save_trajectory = bool(save_trajectory or match.exposed)
    anchor = match.last
    const_nodes = []
    for i, value in enumerate(consts):
        name = f"{const_prefix}_{i}"
        gm.register_buffer(name, value)
        with graph.inserting_after(anchor):
            anchor = graph.get_attr(name)
        const_nodes.append(anchor)
    # Inputs no state reaches differentiably enter detached, so their gradients stay None, as eager's do (an
    # optimizer skips a None gradient; a zero one still decays the weight and moves its momentum).
    no_grad_groups, no_grad_slices, no_grad_invariants = undifferentiated_inputs(match)

    def detached(n: Node) -> Node:
        nonlocal anchor
        value = node_value(n)
        if isinstance(value, torch.Tensor) and not value.requires_grad:
            return n  # a buffer, an integer index: nothing to detach
        with graph.inserting_after(anchor):
            anchor = graph.call_function(torch.Tensor.detach, (n,))
        anchor.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "val", "tensor_meta")})
        return anchor

    invariants = [detached(n) if i in no_grad_invariants else n for i, n in enumerate(match.invariants)]
    stacked = []
    if match.per_step:  # every group by one call, then one (L, ...) input per group
        flat = [detached(n) if k in no_grad_groups else n for k, group in enumerate(match.per_step) for n in group]
        with graph.inserting_after(anchor):
            anchor = multi = graph.call_function(stack_groups, (flat, [len(g) for g in match.per_step]))
        for k in range(len(match.per_step)):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(operator.getitem, (multi, k))
            stacked.append(anchor)
    for k, (_, source, start) in enumerate(match.sliced):  # already stacked in the model: passed as it is
        if start == 0 and _rows(source) == L:
            stacked.append(detached(source) if k in no_grad_slices else source)
            continue
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (source, slice(start, start + L)))
        stacked.append(detached(anchor) if k in no_grad_slices else anchor)
    with graph.inserting_after(anchor):
        call = graph.call_function(op, call_args(
            states=list(match.initial), stacked=stacked, consts=const_nodes, invariants=invariants,
            syms=list(match.sym_invariants), length=L, tol=float(tol), max_iters=int(max_iters), jacobian=jacobian,
            window=int(window), sampler_jacobian=sampler_jacobian, kernels=kernels, save_trajectory=save_trajectory,
            adaptive=bool(adaptive)))
    chain_nodes = [n for blk in match.blocks for n in blk]
    inside = set(chain_nodes)
    created: set[Node] = {call}
    cursor = call

    def place(make) -> Node:
        """Create a node (by `make()`) after the previous one placed here."""
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = make()
        created.add(cursor)
        return cursor

    def read(base: Node, index: int, like: Node) -> Node:
        r = place(lambda: graph.call_function(operator.getitem, (base, index)))
        r.meta.update({k: v for k, v in like.meta.items() if k in ("example_value", "val", "tensor_meta")})
        return r

    def reroute(old: Node, new: Node) -> None:
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside and u not in created)
        if replaced is not None:
            replaced[old] = new

    results = [read(call, s, out) for s, out in enumerate(outputs)]
    if match.exposed:
        # env[node of the chain] -> its value outside the op; unused reads are removed by dead-code elimination.
        trajs = [place(lambda s=s: graph.call_function(operator.getitem, (call, n_state + s))) for s in range(n_state)]
        env: dict[Node, Node] = {}
        for i, blk in enumerate(match.blocks):
            wanted = sorted(j for (e, j) in match.exposed if e == i)
            if not wanted:
                continue
            for s, q in enumerate(match.state_positions):  # the states after steps i - 1 and i
                if i > 0 and match.blocks[i - 1][q] not in env:
                    env[match.blocks[i - 1][q]] = read(trajs[s], i - 1, match.blocks[i - 1][q])
                env[blk[q]] = results[s] if i == L - 1 else read(trajs[s], i, blk[q])
            # Copy the block's nodes that the exposed ones depend on (in block order: topological).
            inner = {n: j for j, n in enumerate(blk)}
            need, stack = set(), [blk[j] for j in wanted if blk[j] not in env]
            while stack:
                n = stack.pop()
                if n not in need:
                    need.add(n)
                    stack.extend(x for x in n.all_input_nodes if x in inner and x not in env)
            for n in sorted(need, key=inner.get):
                env[n] = place(lambda n=n: graph.node_copy(n, lambda a: env.get(a, a)))
            for j in wanted:
                reroute(blk[j], env[blk[j]])
    for out, r in zip(outputs, results):
        reroute(out, r)
    for n in reversed(chain_nodes):
        graph.erase_node(n)
    log.debug("rewrote %s..%s (%d steps of %d nodes) into %s", match.first.name, match.last.name, L,
              match.nodes_per_step, call.name)
    return call
