"""Out-of-place rewrites of in-place ops on tensors that nothing else aliases.

Real models mutate their activations: torchvision's and timm's residual blocks run `nn.ReLU(inplace=True)`
and `out += identity`, which Dynamo records as `relu(x, inplace=True)` and `operator.iadd(out, identity)`.
A block with an in-place op cannot be evaluated out of order, so the chain finder declines it. Most such
mutations are private to the block: the mutated tensor was created a few ops earlier, and no view of it
exists. For those, the in-place op is the out-of-place op plus "later readers see the new value", and
this pass rewrites it so: `relu(x, inplace=True)` -> `relu(x)`, `iadd(a, b)` -> `add(a, b)`,
`a.mul_(b)` -> `a.mul(b)`, `torch.relu_(a)` -> `torch.relu(a)`, `a[idx] = v` -> `assign(a, idx, v)` (a copy
with `v` written in); every node after the mutation that reads `a` (or the in-place op's own result, which is
`a`) reads the new node instead. Item assignments into one tensor several times with no read between (a
preallocated output written every step) are left to `defer_slice_writes`, which moves them after the loop.

A mutation is rewritten only when it is provably private (else it is left alone and its block declined):
- the mutated tensor was produced by an op of this graph (never a graph input, parameter or buffer);
- no other node's value shares its storage (no view of it, no view it is of), judged from the storages
  of Dynamo's example values, except the in-place ops on it themselves;
- the op has an out-of-place twin, and every tensor it reads has the mutated tensor's dtype (or is
  0-d), so the twin's result has the same dtype and shape as the in-place result.
AOTAutograd functionalizes the whole graph again later, so this changes nothing downstream.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from .fx_utils import bound_arguments, mutates_in_place, node_value

# Node meta keys this pass writes: why it left an in-place op in place (the finder's decline reason quotes it);
# and the nodes it moved to the end of the graph (running-statistics writes), which are never part of a chain
# (random_draws.py marks the draws it moves to the top so, too).
KEPT_META = "pcr_kept_in_place"
DEFERRED_META = "pcr_deferred"
UPDATE_META = "pcr_slice_update"  # defer_slice_writes' undo record while it checks an accumulation's rewrite

OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
    operator.imod: operator.mod, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
}
# Trailing-underscore names that are not "the out-of-place op, in place" (or whose twin differs).
_NOT_TWINS = {"resize_", "resize_as_", "set_", "requires_grad_", "share_memory_", "retain_grad_", "copy_",
              "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
              "log_normal_", "random_", "index_put_", "put_", "scatter_", "scatter_add_", "masked_scatter_",
              "index_copy_", "index_fill_", "index_add_", "masked_fill_", "squeeze_", "unsqueeze_", "t_",
              "transpose_", "swapdims_", "swapaxes_", "as_strided_", "detach_", "rename_", "refine_names_",
              "align_to_", "record_stream_", "pin_memory_", "sparse_resize_", "sparse_resize_and_clear_"}


def assign(t: torch.Tensor, index, value) -> torch.Tensor:
    """`t[index] = value` out of place: a copy of `t` with `value` written at `index` (the twin of
    `operator.setitem` on a private tensor)."""
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool and index.shape == t.shape and (
            isinstance(value, (int, float, bool)) or isinstance(value, torch.Tensor) and value.dim() == 0):
        # a number at a full-shape mask (`h[h > 1] = 1`): where() batches under vmap, masked indexing does not
        value = value.to(t.dtype) if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=t.dtype,
                                                                                       device=t.device)
        return torch.where(index, value, t)
    out = t.clone()
    out[index] = value
    return out


def _is_setitem(n: Node) -> bool:
    return n.op == "call_function" and n.target is operator.setitem and len(n.args) == 3 \
        and isinstance(n.args[0], Node) and not n.kwargs


def _storages(n: Node) -> list:
    out = []
    for v in tree_flatten(node_value(n))[0]:
        if isinstance(v, torch.Tensor):
            try:
                out.append(StorageWeakRef(v.untyped_storage()))
            except (NotImplementedError, RuntimeError):  # sparse or otherwise storage-less
                out.append(None)
    return out


def _twin(n: Node):
    """(op, target, args, kwargs) of the out-of-place form of in-place node `n`, or None."""
    args, kwargs = tuple(n.args), dict(n.kwargs)
    if n.op == "call_function":
        if _is_setitem(n):
            return "call_function", assign, args, kwargs
        if n.target in OUT_OF_PLACE_OPERATORS:
            return "call_function", OUT_OF_PLACE_OPERATORS[n.target], args, kwargs
        bound = bound_arguments(n)
        if bound is not None and bound.arguments.get("inplace") is True:
            bound.arguments["inplace"] = False
            return "call_function", n.target, bound.args, bound.kwargs
        name = getattr(n.target, "__name__", None)
        if isinstance(name, str) and name.endswith("_") and not name.endswith("__") and name not in _NOT_TWINS:
            for owner in (torch, F, torch.Tensor):
                if getattr(owner, name, None) is n.target and callable(getattr(owner, name[:-1], None)):
                    return "call_function", getattr(owner, name[:-1]), args, kwargs
        return None
    if n.op == "call_method" and isinstance(n.target, str):
        name = n.target
        if name.endswith("_") and not name.endswith("__") and name not in _NOT_TWINS \
                and callable(getattr(torch.Tensor, name[:-1], None)):
            return "call_method", name[:-1], args, kwargs
    return None


def _mutated(n: Node) -> Node | None:
    """The node whose tensor in-place node `n` mutates (its first argument)."""
    if n.args and isinstance(n.args[0], Node):
        return n.args[0]
    return None


def _same_dtype_reads(n: Node, target: Node) -> bool:
    dtype = getattr(node_value(target), "dtype", None)
    for x in tree_flatten((n.args, n.kwargs))[0]:
        if isinstance(x, Node) and x is not target:
            v = node_value(x)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.dtype != dtype:
                return False
    return True


def _not_private(root: Node, rest: list[Node], members: list[Node]) -> str | None:
    """Why the in-place ops on the tensor of `root` cannot be rewritten out of place, or None."""
    if root.op == "placeholder":
        return f"it writes {root.name}, an input, parameter or buffer of the graph"
    if root.op not in ("call_function", "call_method") or not isinstance(node_value(root), torch.Tensor):
        return f"it writes a value of {root.name} that is not a plain tensor"
    writes = [m for m in rest if _is_setitem(m)]
    if len(writes) > 1:
        # Several item assignments with no read between (`out[:, t] = h` into a preallocated output, every step):
        # defer_slice_writes moves those after the loop; written out of place each would copy the whole tensor.
        pos = {n: i for i, n in enumerate(root.graph.nodes)}
        reads = sorted(pos[u] for u in root.users if not _is_setitem(u))
        if any(not any(pos[a] < r < pos[b] for r in reads) for a, b in zip(writes, writes[1:])):
            return f"it assigns into {root.name} several times with no read between"
    for m in rest:
        if _twin(m) is None:
            if mutates_in_place(m):
                return f"{m.name} has no out-of-place form"
            return f"{m.name} is a view of, or aliases, the written tensor"
        if _is_setitem(m):  # returns nothing; writes (a cast of) its value into part of the tensor
            if _mutated(m) not in members:
                return f"{m.name} writes a tensor that other values alias"
            continue
        if _mutated(m) not in members or not isinstance(node_value(m), torch.Tensor) or len(_storages(m)) != 1:
            return f"{m.name} writes a tensor that other values alias"
        if not _same_dtype_reads(m, _mutated(m)):
            return f"{m.name} reads a tensor of another dtype (out of place it would promote)"
    return None


def functionalize_inplace(graph: Graph) -> int:
    """Rewrite the private in-place ops of `graph` out of place (see the module docstring); returns how many."""
    nodes = list(graph.nodes)
    groups: dict[object, list[Node]] = defaultdict(list)
    for n in nodes:
        # an item assignment (its value is None) belongs to the group of the tensor it writes
        for s in _storages(n.args[0]) if _is_setitem(n) else _storages(n):
            if s is not None and n.op != "output":
                groups[s].append(n)
    rewritable: set[Node] = set()  # in-place nodes of private groups
    for members in groups.values():
        root, rest = members[0], members[1:]
        if not rest:
            continue
        why = _not_private(root, rest, members)
        if why is None:
            rewritable.update(rest)
        else:  # kept in place; the chain finder quotes why when it declines the block
            for m in rest:
                if mutates_in_place(m):
                    m.meta[KEPT_META] = why
    if not rewritable:
        return 0
    group_of = {m: key for key, members in groups.items() if members[-1] in rewritable for m in members}
    latest = {key: members[0] for key, members in groups.items() if members[-1] in rewritable}

    def read(a: Node) -> Node:
        return latest[group_of[a]] if a in group_of else a

    for n in nodes:
        n.args = torch.fx.node.map_arg(n.args, read)
        n.kwargs = torch.fx.node.map_arg(n.kwargs, read)
        if n in rewritable:
            op, target, args, kwargs = _twin(n)
            with graph.inserting_before(n):
                new = graph.create_node(op, target, args, kwargs)
            new.meta = dict(n.meta)
            if _is_setitem(n):  # the copy has the written tensor's value
                new.meta["example_value"] = node_value(n.args[0])
            latest[group_of[n]] = new
    for n in reversed(nodes):
        if n in rewritable and not n.users:
            graph.erase_node(n)
    return len(rewritable)


def defer_running_stat_updates(graph: Graph) -> int:
    """Move BatchNorm's running-statistics updates in training mode to the end of the graph.

    `F.batch_norm(x, running_mean, running_var, w, b, training=True, momentum, eps)` normalises by the
    batch statistics and, as a side effect, writes the running statistics; `nn.BatchNorm*` also bumps
    `num_batches_tracked` in place just before. Those writes make every training-mode BatchNorm block
    ineligible. When nothing else in the graph reads the buffers, they are read by no one before the
    graph returns, so the writes can happen last: the call becomes the pure `F.batch_norm(x, None, None,
    w, b, True, momentum, eps)`, and `running_mean.lerp_(mean(x.detach()), momentum)` /
    `running_var.lerp_(var(x.detach(), unbiased), momentum)` (what the kernel computes) and the
    `num_batches_tracked` bump are emitted before the output. A chain then reads `x` back from its
    solved trajectory for them. Cumulative averaging (`momentum=None`) is left alone. A statistic may also be
    one row `buf[i]` of a stacked buffer (`StackedLayers` holds each layer's running statistics as rows of
    one `(L, C)` buffer) when the buffer is read only row by row, each row once, each by one such call:
    the rows are disjoint, so their writes move just the same (the row is taken again at the end). Returns
    how many calls were changed.
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    changed = 0
    for n in list(graph.nodes):
        bound = bound_arguments(n) if n.op == "call_function" and n.target is F.batch_norm else None
        if bound is None:
            continue
        args = bound.arguments
        x, rm, rv, momentum = args["input"], args["running_mean"], args["running_var"], args["momentum"]
        if args["training"] is not True or not isinstance(momentum, float) or not isinstance(x, Node):
            continue
        if not all(_private_buffer(b, n, _is_training_batch_norm) for b in (rm, rv)):
            continue
        xv = node_value(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() < 2:
            continue
        dims = [0, *range(2, xv.dim())]
        args["running_mean"] = args["running_var"] = None
        n.args, n.kwargs = bound.args, bound.kwargs
        with graph.inserting_before(output):
            bufs = [_retake(graph, b) for b in (rm, rv)]  # a stacked buffer's row: taken again here
            # Not differentiated, and in the buffers' precision (the kernel accumulates in float for half).
            detached = graph.call_method("detach", (x,))
            data = graph.call_method("to", (detached, node_value(rm).dtype))
            mean = graph.call_method("mean", (data, dims))
            var = graph.call_method("var", (data, dims), {"unbiased": True})
            updates = [graph.call_method("lerp_", (buf, stat, momentum)) for buf, stat in zip(bufs, (mean, var))]
        for node, like in ((mean, rm), (var, rv), *zip(updates, (rm, rv))):  # example values, for later passes
            node.meta["example_value"] = node_value(like)
        for node in (detached, data, mean, var, *updates, *bufs):
            node.meta[DEFERRED_META] = True
        for b in (rm, rv):
            if b.op != "placeholder":  # the row read in the chain's step, now read by no one
                graph.erase_node(b)
        changed += 1
    if changed:
        # nn.BatchNorm's `num_batches_tracked.add_(1)`: an in-place bump of an integer buffer nobody reads (or of
        # one row of a stacked one, read only by such bumps).
        for n in list(graph.nodes):
            if n.op == "call_method" and n.target == "add_" and not n.users and isinstance(n.args[0], Node) \
                    and _private_buffer(n.args[0], n, _is_bump) \
                    and getattr(node_value(n.args[0]), "dtype", None) == torch.long:
                if n.args[0].op != "placeholder":
                    output.prepend(n.args[0])
                    n.args[0].meta[DEFERRED_META] = True
                output.prepend(n)
                n.meta[DEFERRED_META] = True
    return changed


def _is_training_batch_norm(n: Node) -> bool:
    bound = bound_arguments(n) if n.op == "call_function" and n.target is F.batch_norm else None
    return bound is not None and bound.arguments["training"] is True


def _is_bump(n: Node) -> bool:
    return n.op == "call_method" and n.target == "add_" and not n.users


def _row(b: Node) -> int | None:
    """i, when `b` is `buf[i]` (a non-negative int index) of a graph input `buf`."""
    if b.op == "call_function" and b.target is operator.getitem and len(b.args) == 2 and not b.kwargs \
            and isinstance(b.args[0], Node) and b.args[0].op == "placeholder" and type(b.args[1]) is int \
            and b.args[1] >= 0:
        return b.args[1]
    return None


def _private_buffer(b, user: Node, kind) -> bool:
    """Whether `user` alone reads buffer `b`: a graph input read by `user` only, or one row `buf[i]` of a
    graph input read only row by row, each row once, each row by one node of `kind` or one already moved to
    the end (`user` reading `b`)."""
    if not isinstance(b, Node) or set(b.users) != {user}:
        return False
    if b.op == "placeholder":
        return True
    if _row(b) is None:
        return False
    rows = list(b.args[0].users)
    indices = [_row(r) for r in rows]
    return None not in indices and len(set(indices)) == len(indices) and all(  # rows already moved count
        len(r.users) == 1 and (kind(u := next(iter(r.users))) or u.meta.get(DEFERRED_META)) for r in rows)


def _retake(graph: Graph, b: Node) -> Node:
    """`b` itself when it is a graph input, else a new `buf[i]` (inserted where the graph is inserting)."""
    if b.op == "placeholder":
        return b
    new = graph.call_function(operator.getitem, b.args)
    new.meta["example_value"] = node_value(b)
    return new


def _is_slice_write(n: Node, buf: Node) -> bool:
    return _is_setitem(n) and n.args[0] is buf


def _region(index, shape) -> list[tuple[int, int]] | None:
    """The half-open interval `index` (basic indexing: ints, unit-step slices, None, one Ellipsis) selects in each
    dimension of a tensor of `shape` (static ints); None where that cannot be told statically."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(e, (Node, torch.Tensor, list, bool)) for e in index) or \
            not all(type(d) is int for d in shape) or sum(e is Ellipsis for e in index) > 1:
        return None
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    out, dim = [], 0
    for e in index:
        if e is None:
            continue
        if e is Ellipsis:
            for _ in range(len(shape) - consumed):
                out.append((0, shape[dim]))
                dim += 1
            continue
        if dim >= len(shape):
            return None
        size = shape[dim]
        if type(e) is int:
            i = e + size if e < 0 else e
            if not 0 <= i < size:
                return None
            out.append((i, i + 1))
        elif isinstance(e, slice) and all(v is None or type(v) is int for v in (e.start, e.stop, e.step)) \
                and e.step in (None, 1):
            lo, hi, _ = e.indices(size)
            out.append((lo, max(lo, hi)))
        else:
            return None
        dim += 1
    return out + [(0, d) for d in shape[dim:]]


def _disjoint(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(hi_a <= lo_b or hi_b <= lo_a or lo_a >= hi_a or lo_b >= hi_b
               for (lo_a, hi_a), (lo_b, hi_b) in zip(a, b))


def _accumulation(w: Node, buf: Node) -> tuple[Node, Node] | None:
    """(view, update) when slice write `w` is the end of `buf[idx] += c` (`op=` any augmented operator), which
    Dynamo records as `view = buf[idx]; update = iadd(view, c); buf[idx] = update`: the view read only by the
    update, the update only by the write, right before it, and `c` (a 0-d tensor or one of the buffer's dtype)
    giving the out-of-place op the in-place op's dtype. Else None."""
    a = w.args[2]
    if not (isinstance(a, Node) and a.op == "call_function" and a.target in OUT_OF_PLACE_OPERATORS
            and a.next is w and set(a.users) == {w} and len(a.args) == 2 and not a.kwargs):
        return None
    v = a.args[0]
    if not (isinstance(v, Node) and v.op == "call_function" and v.target is operator.getitem and v.args[0] is buf
            and len(v.args) == 2 and not v.kwargs and v.args[1] == w.args[1] and set(v.users) == {a}):
        return None
    if not all(isinstance(node_value(n), torch.Tensor) for n in (v, a)) or not _same_dtype_reads(a, v):
        return None
    return v, a


def defer_slice_writes(graph: Graph) -> int:
    """Move the writes into a preallocated output (`out[:, t] = h` in a loop over time) down to its first reader.

    A recurrent loop that fills a buffer made before the loop (`out = x.new_empty(B, T, H)`, then
    `out[:, t] = h` every step) writes it in place in every step, which makes every step ineligible. When
    nothing reads the buffer between its first write and a later reader (a view of it, any other use, a use of
    any view of it, also of one taken before the loop, or the graph's output), the writes can happen just
    before that reader, in their order: the steps then only compute `h`, and a chain reads each step's `h`
    back from its solved trajectory for them. A buffer is moved only when
    it is made in the graph and is no view of an earlier value, and only when no node between a write and the
    reader writes in place to a tensor the write reads (its value or index), so each write stores what it
    stored before.

    An accumulation into a slice (`out[:, t] += h`, `_accumulation`) reads the buffer in its step; it becomes
    `out[:, t] = out[:, t] + h` (the same values: nothing reads the buffer between the in-place op and the write
    after it) and moves with the others when the slice it reads is disjoint from the slice of every earlier
    write (static indices: ints and slices), so it reads, before the moved writes, what it read after them.
    Returns how many writes moved.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    groups: dict[object, list[Node]] = defaultdict(list)
    for n in nodes:
        for s in _storages(n):
            if s is not None and n.op != "output":
                groups[s].append(n)
    mutators = [n for n in nodes if mutates_in_place(n) and n.args and isinstance(n.args[0], Node)]
    moved = 0
    for buf in nodes:
        writes = sorted((u for u in buf.users if _is_slice_write(u, buf)), key=pos.__getitem__)
        if not writes or buf.op not in ("call_function", "call_method") or len(_storages(buf)) != 1:
            continue
        [storage] = _storages(buf)
        if storage is None or groups[storage][0] is not buf:
            continue
        first = pos[writes[0]]
        acc = {w: va for w in writes if (va := _accumulation(w, buf)) is not None}
        own = {m for va in acc.values() for m in va}  # the accumulations' views and updates
        # every node that reads the buffer's memory: its views and what reads any of them (a view taken before
        # the loop and read after it reads what the writes stored)
        readers = [m for m in (*groups[storage], *(u for g in groups[storage] for u in g.users))
                   if pos[m] > first and not _is_slice_write(m, buf) and m not in own]
        stop = min(readers, key=pos.__getitem__) if readers else next(n for n in reversed(nodes) if n.op == "output")
        batch = [w for w in writes if pos[w] < pos[stop]]
        if len(batch) < 2 or any(pos[m] > first and m not in {x for w in batch for x in acc.get(w, ())} for m in own
                                 if pos[m] < pos[stop]):
            continue
        shape = tuple(node_value(buf).shape)
        if any(not _reads_before_writes(w, batch, shape, pos) for w in batch if w in acc):
            continue
        views = [acc[w][0] for w in batch if w in acc]
        start = min([*views, writes[0]], key=pos.__getitem__)
        if any(pos[start] < pos[m] < first and m not in own for m in groups[storage]):
            continue  # something between the first accumulation's read and the first write touches the buffer
        updates = [acc[w][1] for w in batch if w in acc]
        for a in updates:  # out of place: a new tensor, no longer the buffer's
            a.target, a.meta[UPDATE_META] = OUT_OF_PLACE_OPERATORS[a.target], (a.target, a.meta.get("example_value"))
            a.meta.pop(KEPT_META, None)
            a.meta["example_value"] = node_value(a).clone()
        if not all(_keeps_reads(w, stop, pos, mutators) for w in batch):
            for a in updates:  # as it was
                a.target, a.meta["example_value"] = a.meta.pop(UPDATE_META)
            continue
        for a in updates:
            del a.meta[UPDATE_META]
        if updates:
            # the copy goes right after the last node before the views that touches the buffer (before the loop)
            last = max((m for m in groups[storage] if pos[m] < pos[start]), key=pos.__getitem__)
            _read_initial_copy(graph, buf, last, views)
        for w in batch:
            stop.prepend(w)
            w.meta[DEFERRED_META] = True
        moved += len(batch)
    return moved


def _read_initial_copy(graph: Graph, buf: Node, after: Node, views: list[Node]) -> None:
    """Point the accumulations' views at a copy of `buf` taken right after `after`, the last node before them that
    touches the buffer: they read only slices no earlier write touched, so the copy holds what they read, and the
    buffer the moved writes then mutate is no input of the chain (whose backward would find it modified in
    place)."""
    with graph.inserting_after(after):
        initial = graph.call_method("clone", (buf,))
    initial.meta["example_value"] = node_value(buf).clone()
    for v in views:
        v.args = (initial, *v.args[1:])
        v.meta["example_value"] = node_value(initial)[v.args[1]]


def _reads_before_writes(w: Node, batch: list[Node], shape: tuple, pos: dict) -> bool:
    """Whether the slice accumulation `w` reads is disjoint from the slice of every write of `batch` before it."""
    mine = _region(w.args[1], shape)
    if mine is None:
        return False
    for other in batch:
        if pos[other] >= pos[w]:
            break
        theirs = _region(other.args[1], shape)
        if theirs is None or not _disjoint(mine, theirs):
            return False
    return True


def _keeps_reads(w: Node, stop: Node, pos: dict, mutators: list[Node]) -> bool:
    """Whether no node between write `w` and `stop` writes in place to a tensor `w` reads (besides its buffer)."""
    read = {s for a in w.all_input_nodes[1:] for s in _storages(a) if s is not None}
    if any(s is None for a in w.all_input_nodes[1:] for s in _storages(a)):
        return False
    return not any(pos[w] < pos[m] < pos[stop] and read & set(_storages(m.args[0])) for m in mutators)
