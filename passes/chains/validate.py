"""Step 3 of the finder: validate a candidate's blocks as a chain, in named steps, or say why not.

1. :func:`_check_eligible`: every node may run out of order (``eligibility.py``), outside torch.func transforms,
   all in the same autocast contexts;
2. :func:`_reference_tags`: where each argument leaf of each block's nodes comes from, as :class:`Tag`\\ s;
   :func:`_check_same_references`: every block references the same positions of its own block and of the
   previous one (block 0 reads the initial state there), or reads two steps back (a :class:`Lagged` run);
3. :func:`_initial_states`: the carried state's positions and its initial values;
4. :func:`_exposed_values`: values of earlier steps read after the chain;
5. :func:`_classify_inputs`: each outside reference and constant becomes an :class:`~match.ArgRef`: per-step
   (a group of nodes, or the slices of one stacked tensor), invariant, symbolic size, lifted or folded
   constant, inlined body.

A violation raises :class:`Split` with the sub-ranges of steps worth trying and the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten

from ..fx_utils import arg_leaves, bound_arguments, is_tensor_node, node_value
from . import scalar_forms
from .eligibility import body_structure, ineligibility, inlinable_body, is_autocast_marker, target_name
from .match import ArgRef, ChainMatch

# Targets where a Python scalar argument may be replaced by a 0-d tensor with the same result.
LIFTABLE_TARGETS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.where,
    torch.maximum, torch.minimum,
    # comparisons with the step index (`lengths > t`: a padding mask per step); bool results, as for a number
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
}
LIFTABLE_METHODS = {"add", "sub", "mul", "div", "pow", "__getitem__", "__add__", "__mul__", "__sub__",
                    "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__",
                    "gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__"}
# Tensor factories whose per-step variants are folded into a per-step input (computed once at rewrite).
FOLDABLE_TARGETS = {torch.tensor, torch.full, torch.ones, torch.zeros, torch.arange, torch.as_tensor,
                    torch.scalar_tensor, torch.linspace, torch.empty, torch.eye}
# Per-step slices of one tensor along dim 0: `W[i]`, `torch.select(W, 0, i)`, `W.select(0, i)`.
SLICE_TARGETS = {operator.getitem, torch.select, "__getitem__", "select"}


class Split(Exception):
    """`pieces`: the sub-ranges of steps worth trying; `every_period`: the reason holds for any period of
    the same region (an ineligible op), so a multiple of the period is not worth trying."""

    def __init__(self, pieces: list[tuple[int, int]], reason: str, every_period: bool = False):
        super().__init__(reason)
        self.pieces, self.reason, self.every_period = pieces, reason, every_period


class Lagged(Split):
    """The blocks read, at `slots` ((block position, argument leaf) pairs), a value of two steps back: a
    chain once `passes/carry.py` carries that value through the step between."""

    def __init__(self, blocks, slots: list[tuple[int, int]]):
        # Seen in a report only when `passes/carry.py` could not carry the value (or before it runs).
        super().__init__([], "steps read a value from two steps back, not carried through the step between")
        self.blocks, self.slots = blocks, slots


class IntegerState(Split):
    """The blocks carry integer or boolean states at block `positions` beside floating ones: a chain of the
    floating part where no floating value depends on them (``passes/defer.py`` moves them after it)."""

    def __init__(self, blocks, positions: tuple[int, ...], name: str):
        super().__init__([], f"the carried state {name} is not a floating-point tensor")
        self.blocks, self.positions = blocks, positions


class Tag(NamedTuple):
    """Where one argument leaf of a block's node comes from, before it is classified: a node of the same
    block ("internal", at position `pos`), of the previous one ("state"), of `lag` blocks back ("far"),
    outside the chain ("outside"), or a literal ("const")."""

    kind: Literal["internal", "state", "far", "outside", "const"]
    pos: int = -1
    lag: int = 0


OUTSIDE, CONST = Tag("outside"), Tag("const")


# Autocast devices whose ambient state is read (the device types torch.autocast accepts on this machine).
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

# One `torch.autocast` context: (device_type, dtype, enabled, cache_enabled), the arguments of
# `torch.amp._enter_autocast` as Dynamo records them (None: the device's default).
AutocastContext = tuple


def _ambient_autocast() -> tuple[AutocastContext, ...]:
    """The autocast contexts open around the compiled call (Dynamo's graph has no _enter_autocast node for
    them: autocast is global state, which Dynamo guards, so this graph only ever runs inside them)."""
    any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
    if any_enabled is not None and not any_enabled():
        return ()
    out = []
    for dev in AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(dev):
                out.append((dev, torch.get_autocast_dtype(dev), True, torch.is_autocast_cache_enabled()))
        except (RuntimeError, TypeError, AttributeError):  # a device type this build does not know
            continue
    return tuple(out)


def cast_dtype(context: AutocastContext, device: str) -> torch.dtype | None:
    """The dtype an autocast `context` casts to on `device` (its device's default where it names none), None
    where it is for another device type or disabled."""
    dev, dtype, enabled, *_ = tuple(context) + (None,) * 3
    if dev != device or not enabled:
        return None
    return dtype if dtype is not None else torch.get_autocast_dtype(dev)


def autocast_states(graph: Graph) -> dict[Node, tuple[AutocastContext, ...]]:
    """The autocast contexts each node of `graph` runs in, outermost first: those open around the compiled
    call, then the `torch.autocast` regions of the graph itself (Dynamo's _enter_autocast / _exit_autocast
    nodes; an exit closes the region its argument entered). Nodes outside every region map to ()."""
    enter, exit_ = getattr(torch.amp, "_enter_autocast", None), getattr(torch.amp, "_exit_autocast", None)
    ambient = _ambient_autocast()
    stack: list[tuple[Node, AutocastContext]] = []
    states: dict[Node, tuple[AutocastContext, ...]] = {}
    for n in graph.nodes:
        states[n] = ambient + tuple(vals for _, vals in stack)
        if n.op == "call_function" and n.target is enter and enter is not None:
            stack.append((n, tuple(n.args)))
        elif n.op == "call_function" and n.target is exit_ and exit_ is not None and n.args:
            stack = [(m, vals) for m, vals in stack if m is not n.args[0]]
    return states


# Dynamo traces torch.func.grad / vjp / jvp / vmap into the graph between these calls (torch._C._functorch's);
# the values inside are functorch-wrapped tensors at that level, which the chain op's solve cannot take.
FUNCTORCH_LEVELS = {f"_{kind}_{edge}_nesting": edge == "increment" for kind in ("grad", "jvp", "vmap", "func")
                    for edge in ("increment", "decrement")}
TRANSFORM = "inside a torch.func transform traced into the graph ({}; not supported; left to Inductor)"


def _level_edge(n: Node) -> bool | None:
    """True where `n` opens a functorch transform level, False where it closes one, None elsewhere."""
    if n.op != "call_function":
        return None
    return FUNCTORCH_LEVELS.get(getattr(n.target, "__name__", None))


def transform_nodes(graph: Graph) -> dict[Node, str]:
    """Nodes inside torch.func transforms traced into the graph (`torch.compile(torch.func.grad(f))`: between
    functorch's `_grad_increment_nesting` and `_grad_decrement_nesting`, and their vmap / jvp kin), each with
    the reason a chain op cannot run there."""
    inside: dict[Node, str] = {}
    levels: list[str] = []  # open transform levels, by the op that opened each
    for n in graph.nodes:
        edge = _level_edge(n)
        if edge:
            levels.append(n.target.__name__)
        elif edge is False:
            del levels[-1:]
        elif levels:
            inside[n] = TRANSFORM.format(levels[-1])
    return inside


def autocast_compute_dtype(match: ChainMatch) -> torch.dtype | None:
    """The lowest precision torch.autocast makes a step compute in: the dtype of an enabled autocast context
    of the states' device (around the steps, or a region a step or its checkpointed body opens) that a value
    of step 0 has. None where no value of a step has it: outside autocast, and under it for a float64 state
    (autocast leaves float64 alone) or a step whose casting ops run with autocast turned off (a float32 step
    then computes in float32, and keeps float32's tolerance)."""
    state = node_value(match.initial[0]) if match.initial else None
    if not isinstance(state, torch.Tensor) or not state.is_floating_point():
        return None
    device = state.device.type
    owner = match.first.graph.owning_module
    nodes = list(match.blocks[0])
    for name in match.submodules:  # inlined bodies (activation checkpointing): their own nodes and regions
        body = owner.get_submodule(name) if owner is not None else None
        nodes += list(body.graph.nodes) if isinstance(body, torch.fx.GraphModule) else []
    enter = getattr(torch.amp, "_enter_autocast", None)
    contexts = list(match.autocast) + [tuple(n.args) for n in nodes if n.op == "call_function" and n.target is enter]
    cast_to = {cast_dtype(c, device) for c in contexts} - {None}
    found = None
    for n in nodes:
        for v in tree_flatten(node_value(n))[0]:
            if isinstance(v, torch.Tensor) and v.dtype in cast_to and v.dtype.is_floating_point and \
                    (found is None or torch.finfo(v.dtype).eps > torch.finfo(found).eps):
                found = v.dtype
    return found


def validate(blocks: list[tuple[Node, ...]], autocast: dict[Node, tuple] | None = None,
             in_transform: dict[Node, str] | None = None) -> ChainMatch:
    """Validate blocks as a chain or raise :class:`Split` with the sub-ranges worth trying and the reason.
    `autocast`: the autocast contexts of each node (:func:`autocast_states`); `in_transform`: nodes inside
    torch.func transforms, with the reason (:func:`transform_nodes`); none when omitted."""
    contexts = _check_eligible(blocks, autocast or {}, in_transform or {})
    where = {n: (i, j) for i, blk in enumerate(blocks) for j, n in enumerate(blk)}
    tags = [_reference_tags(blocks, i, where) for i in range(len(blocks))]
    _check_same_references(blocks, tags)
    ref = tags[1]
    state_positions, initial = _initial_states(blocks, ref)
    exposed = _exposed_values(blocks, where, state_positions)
    inputs = _classify_inputs(blocks, ref, where, exposed, {q: s for s, q in enumerate(state_positions)})
    return ChainMatch(
        blocks=tuple(tuple(b) for b in blocks),
        state_positions=state_positions,
        initial=initial,
        per_step=tuple(inputs.per_step),
        invariants=tuple(inputs.invariants),
        sym_invariants=tuple(inputs.sym_invariants),
        lifted=tuple(inputs.lifted),
        folded=tuple(inputs.folded),
        arg_refs=tuple(inputs.arg_refs),
        exposed=tuple(exposed),
        submodules=tuple(inputs.submodules),
        sliced=tuple(inputs.sliced),
        autocast=contexts,
    )


# --- 1. eligibility ---------------------------------------------------------------------------------------


def _check_eligible(blocks, autocast: dict[Node, tuple], in_transform: dict[Node, str]) -> tuple:
    """Every node may run out of order, outside torch.func transforms, and every step runs in the same
    autocast contexts (returned: the template enters them, so that the chain op evaluates its steps with the
    casts eager applies)."""
    for n in blocks[0]:
        why = ineligibility(n)
        if why:
            raise Split([], f"block contains {why}", every_period=True)
    for n in (*blocks[0], *blocks[-1]):  # the chain op's solve cannot take a transform's wrapped tensors
        if n in in_transform:
            raise Split([], in_transform[n], every_period=True)
    members = set(blocks[0])
    for n in blocks[0]:
        if is_autocast_marker(n) and n.target is torch.amp._exit_autocast and n.args[0] not in members:
            raise Split([], "a torch.autocast region crosses the steps' boundaries", every_period=False)
    # Every step runs in the contexts of step 0, position by position (a region a step opens and closes
    # itself is copied into the template with the step; the contexts around the steps are entered by it).
    ref = [autocast.get(n, ()) for n in blocks[0]]
    for i, blk in enumerate(blocks):
        if [autocast.get(n, ()) for n in blk] != ref:
            # a region opens or closes at step i: the steps on either side are tried on their own
            whole = len({autocast.get(n, ()) for n in blk}) == 1
            raise Split([(0, i), (i if whole else i + 1, len(blocks))],
                        f"a torch.autocast region opens or closes at step {i}")
    return ref[0] if ref else ()


# --- 2. references ----------------------------------------------------------------------------------------


def _reference_tags(blocks, i: int, where: dict) -> tuple[tuple[Tag, ...], ...]:
    """Per node of block i, the :class:`Tag` of each of its argument leaves."""
    out = []
    for n in blocks[i]:
        row = []
        for x in arg_leaves(n):
            if not isinstance(x, Node):
                row.append(CONST)
            elif x not in where:
                row.append(OUTSIDE)
            else:
                bi, q = where[x]
                row.append(Tag("internal", q) if bi == i else Tag("state", q) if bi == i - 1 else
                           Tag("far", q, i - bi))
        out.append(tuple(row))
    return tuple(out)


def _lag2_slots(rows: list[tuple]) -> list[tuple[int, int]]:
    """The (position, leaf) slots where steps 2.. read two steps back and step 1 reads an outside value, with
    every other reference the same in every step; [] when the blocks do not read so."""
    first, ref = rows[0], rows[1]
    if any(r != ref for r in rows[2:]):
        return []
    slots = []
    for j, (a_row, b_row) in enumerate(zip(first, ref)):
        for li, (a, b) in enumerate(zip(a_row, b_row)):
            if b.kind == "far":
                if b.lag != 2 or a != OUTSIDE:
                    return []
                slots.append((j, li))
            elif a != b:
                return []
    return slots


def _check_same_references(blocks, tags) -> None:
    """Blocks 1.. reference alike; block 0 like them except that it reads outside values for the state."""
    k, ref = len(blocks), tags[1]
    if k >= 4 and tags[2] != ref:
        lagged = _lag2_slots(tags[1:])
        if lagged:
            raise Lagged(blocks, lagged)
    for i in range(2, k):
        if tags[i] != ref:
            raise Split([(0, i), (i, k)], f"step {i} reads different values than step 1")
    for row0, row in zip(tags[0], ref):
        for a, b in zip(row0, row):
            if a != b and not (b.kind == "state" and a == OUTSIDE):
                raise Split([(1, k)], "the first step differs from the others")


# --- 3. carried state -------------------------------------------------------------------------------------


def _same_tensor_meta(a: Node, b: Node) -> bool:
    va, vb = node_value(a), node_value(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype and va.device == vb.device)


def _initial_states(blocks, ref) -> tuple[tuple[int, ...], tuple[Node, ...]]:
    """(block positions whose outputs are the carried state, block 0's reads there: z_0)."""
    k = len(blocks)
    state_positions = tuple(sorted({t.pos for row in ref for t in row if t.kind == "state"}))
    if not state_positions:
        raise Split([], "steps do not depend on each other (no carried state)")
    initial: dict[int, Node] = {}
    for j, row in enumerate(ref):
        for t, x in zip(row, arg_leaves(blocks[0][j])):
            if t.kind == "state" and initial.setdefault(t.pos, x) is not x:
                raise Split([(1, k)], "the first step reads two different initial values for one state")
    for q, node in initial.items():
        if not is_tensor_node(node) or not _same_tensor_meta(node, blocks[0][q]):
            raise Split([(1, k)], f"the initial value {node.name} is not a tensor of the state's shape and dtype")
    integer = tuple(q for q in state_positions if not node_value(initial[q]).is_floating_point())
    if integer:
        name = initial[integer[0]].name
        if len(integer) == len(state_positions):
            raise Split([], f"the carried state {name} is not a floating-point tensor")
        raise IntegerState(blocks, integer, name)
    return state_positions, tuple(initial[q] for q in state_positions)


# --- 4. values read after the chain -----------------------------------------------------------------------


def _exposed_values(blocks, where: dict, state_positions: tuple[int, ...]) -> list[tuple[int, int]]:
    """(step, position) of the values used outside the chain other than the last step's states (the op's
    results): a state of an earlier step is read from the solved trajectory, any other node recomputed from
    it after the solve (outside users all come after the chain: blocks are contiguous in graph order)."""
    k, states = len(blocks), set(state_positions)
    exposed = []
    for i, blk in enumerate(blocks):
        for j, n in enumerate(blk):
            if i == k - 1 and j in states:
                continue
            if any(where.get(u, (-1,))[0] not in (i, i + 1) for u in n.users):
                exposed.append((i, j))
    return exposed


# --- 5. inputs and constants ------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """What `_classify_inputs` collects; every dict maps a key to its index (insertion order)."""

    per_step: dict = field(default_factory=dict)  # tuple of one node per step -> group
    invariants: dict = field(default_factory=dict)
    sym_invariants: dict = field(default_factory=dict)
    lifted: dict = field(default_factory=dict)  # tuple of one Python number per step -> lifted constant
    submodules: dict = field(default_factory=dict)
    folded: list = field(default_factory=list)
    sliced: list = field(default_factory=list)
    arg_refs: list = field(default_factory=list)

    @staticmethod
    def index(table: dict, key) -> int:
        return table.setdefault(key, len(table))


def _const_equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _liftable(n: Node, leaf_index: int) -> bool:
    if scalar_forms.liftable(n, leaf_index):  # a keyword number, or an op that needs an equivalent form
        return True
    if n.kwargs:
        n_pos = len(tree_flatten(n.args)[0])
        if leaf_index >= n_pos:
            return False
    if n.op == "call_function":
        return n.target in LIFTABLE_TARGETS
    return n.op == "call_method" and n.target in LIFTABLE_METHODS


def _stacked_slice(blocks, j: int, where: dict) -> tuple[Node, int] | None:
    """(stacked tensor, start) when node j of every block reads step `start + i` of one outside tensor along
    dim 0 (`W[i]`, `torch.select(W, 0, i)`, `W.select(0, i)`, `W.unbind(0)[i]`), else None."""
    node0 = blocks[0][j]
    if node0.op not in ("call_function", "call_method") or node0.target not in SLICE_TARGETS or node0.kwargs:
        return None
    args = [blk[j].args for blk in blocks]
    if any(len(a) != len(args[0]) or len(a) not in (2, 3) for a in args):
        return None
    src = args[0][0]
    if not isinstance(src, Node) or src in where or any(a[0] is not src for a in args):
        return None
    if len(args[0]) == 3:  # select(W, dim, i)
        if any(a[1] != 0 for a in args) or node0.target is operator.getitem:
            return None
        idx = [a[2] for a in args]
    else:
        idx = [a[1] for a in args]
    if not all(type(i) is int for i in idx) or any(idx[i] != idx[0] + i for i in range(len(idx))) or idx[0] < 0:
        return None
    source = src
    if isinstance(node_value(src), (tuple, list)):  # W.unbind(0)[i]: the stacked tensor is W
        if not ((src.op == "call_function" and src.target is torch.unbind) or
                (src.op == "call_method" and src.target == "unbind")):
            return None
        dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
        if dim != 0 or not isinstance(src.args[0], Node):
            return None
        source = src.args[0]
    val = node_value(source)
    if not isinstance(val, torch.Tensor) or val.dim() < 1 or not isinstance(val.shape[0], int) \
            or idx[-1] >= val.shape[0]:
        return None
    return source, idx[0]


def _classify_inputs(blocks, ref, where: dict, exposed: list, sidx: dict[int, int]) -> _Inputs:
    """One :class:`ArgRef` per argument leaf of every block position (or a stacked slice for the position)."""
    k = len(blocks)
    inputs = _Inputs()
    leaves = [[arg_leaves(n) for n in blk] for blk in blocks]
    exposed_positions = {j for _, j in exposed}
    for j, node0 in enumerate(blocks[0]):
        sl = _stacked_slice(blocks, j, where) if j not in exposed_positions else None
        if sl is not None:
            inputs.sliced.append((j, *sl))  # a per-step input: the template reads step l of the stacked tensor
            inputs.arg_refs.append(())
            continue
        column = [leaves[i][j] for i in range(k)]
        const_differs = [li for li, t in enumerate(ref[j]) if t.kind == "const"
                         and any(not _const_equal(column[i][li], column[0][li]) for i in range(1, k))]
        fold = bool(const_differs) and node0.target in FOLDABLE_TARGETS and all(t.kind == "const" for t in ref[j])
        if fold:
            inputs.folded.append(j)
        row_refs = []
        for li, t in enumerate(ref[j]):
            if t.kind == "internal":
                row_refs.append(ArgRef("internal", t.pos))
            elif t.kind == "state":
                row_refs.append(ArgRef("state", sidx[t.pos]))
            elif t.kind == "far":
                raise Split([], f"{node0.name} reads a value from more than one step back")
            elif t.kind == "outside":
                row_refs.append(_outside_ref(blocks, j, li, tuple(c[li] for c in column), inputs))
            else:
                row_refs.append(_const_ref(node0, li, li in const_differs and not fold,
                                           tuple(c[li] for c in column), inputs))
        inputs.arg_refs.append(tuple(row_refs))
    return inputs


def _outside_ref(blocks, j: int, li: int, nodes: tuple[Node, ...], inputs: _Inputs) -> ArgRef:
    """An outside value: the same node in every step (invariant, symbolic size), a checkpointed body per step
    (submodule), or one node per step of one shape (a per-step group)."""
    k, node0 = len(blocks), blocks[0][j]
    if all(x is nodes[0] for x in nodes):
        if isinstance(node_value(nodes[0]), torch.SymInt):
            return ArgRef("symint", inputs.index(inputs.sym_invariants, nodes[0]))
        if not is_tensor_node(nodes[0]):
            raise Split([], f"{node0.name} reads a non-tensor value {nodes[0].name}")
        return ArgRef("invariant", inputs.index(inputs.invariants, nodes[0]))
    if li == 0 and all(inlinable_body(blocks[i][j]) is not None for i in range(k)):
        bodies = [inlinable_body(blocks[i][j]) for i in range(k)]
        first = body_structure(bodies[0])
        differs = next((i for i in range(1, k) if body_structure(bodies[i]) != first), None)
        if differs is None:
            return ArgRef("submodule", inputs.index(inputs.submodules, nodes[0].target))
        pieces = [(0, differs), (differs, k)] if differs > 1 else [(1, k)]
        raise Split(pieces, f"the checkpointed body {nodes[differs].target} of step {differs} "
                            f"differs from {nodes[0].target}")
    if not is_tensor_node(nodes[0]):
        what = "submodules (an activation checkpoint's body, say)" if nodes[0].op == "get_attr" \
            else "non-tensor values"
        raise Split([], f"{node0.name} reads {what} that differ between steps ({nodes[0].name}, {nodes[1].name}, ...)")
    for i, x in enumerate(nodes):
        if not _same_tensor_meta(x, nodes[0]):
            pieces = [(0, i), (i, k)] if i > 1 else [(1, k)]
            raise Split(pieces, f"per-step input {x.name} differs in shape or type from {nodes[0].name}")
    return ArgRef("per_step", inputs.index(inputs.per_step, nodes))


def _leaf_name(n: Node, li: int) -> str:
    """` (`name`)` for argument leaf `li` of `n` where it is a whole keyword or a whole positional argument of an
    op with a Python signature; else ''."""
    n_pos = len(tree_flatten(n.args)[0])
    if li >= n_pos:
        keys = [k for k, v in n.kwargs.items() for _ in tree_flatten(v)[0]]
        return f" (`{keys[li - n_pos]}`)" if li - n_pos < len(keys) else ""
    if len(n.args) != n_pos or (bound := bound_arguments(n)) is None:  # a nested argument, or no signature
        return ""
    names = list(bound.signature.parameters)
    return f" (`{names[li]}`)" if li < len(names) and names[li] not in ("args", "kwargs") else ""


def _const_ref(node0: Node, li: int, differs: bool, values: tuple, inputs: _Inputs) -> ArgRef:
    """A literal: the same in every step ("const"), or a number per step lifted to a per-step tensor."""
    if not differs:
        return ArgRef("const")
    if any(isinstance(v, slice) for v in values):
        raise Split([], f"the slice bounds in argument {li} of {node0.name} ({target_name(node0)}) differ between "
                        "steps (a per-step slice, `x[:, t:t + 2]`); an index by the step's number (`x[:, t]`, "
                        "`x[:, t, None]`) lifts to a per-step input")
    if not (_liftable(node0, li) and all(type(v) in (int, float) for v in values)):
        shown = ", ".join(map(repr, values[:3])) + (", ..." if len(values) > 3 else "")
        raise Split([], f"constant argument {li}{_leaf_name(node0, li)} of {node0.name} ({target_name(node0)}) "
                        f"differs between steps ({shown}) and cannot be lifted to a tensor")
    return ArgRef("lifted", inputs.index(inputs.lifted, values))
