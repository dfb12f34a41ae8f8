"""Finding chains of repeated computation in a Dynamo FX graph. Analysis only: nothing here mutates.

A *chain* is a maximal run of L structurally identical blocks of nodes, where block i+1 reads block i's
outputs (the carried state) and otherwise only its own inputs (per-step: layer parameters, per-step
tensors), inputs shared by every block (loop-invariant), and constants (equal in every block, or lifted
to per-step inputs when they differ, as a sampler's timestep and schedule coefficients do).

Dynamo unrolls Python loops, so a `for layer in self.layers` arrives as the same node sequence repeated.
The finder works in three steps:

1. every compute node gets a structural signature (op, target, argument structure with nodes and
   numbers abstracted, output shape and dtype); repeats of the signature sequence with period p are
   found from the distances between equal signatures (tandem repeats): to the next equal one, and, tried
   where those find no chain, to the 2nd..8th next one (a step that evaluates one sub-module several
   times, as an RK4 step its vector field, repeats with the inner period inside the step's own);
2. for each repeat, the phase of the block boundary minimising the carried tensors is chosen;
3. the candidate is validated: every block must reference the same positions of its own block and of the
   previous one; the first block's references to the previous block are the initial state. A
   violation splits the run (the longest valid pieces stay candidates), and ineligible ops (randomness,
   in-place mutation, side effects) decline it. Declined candidates are returned with their reasons.
   Values of earlier steps used after the chain (every layer's output collected in a list, an RNN's
   per-step outputs) are recorded as `exposed`: the rewrite reads them from the solved trajectory.

Prior art: `torch/_dynamo/graph_region_tracker.py` (repeated regions), `torch/fx/passes/utils/matcher_utils.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten

from pcr_compile.distributed.collectives import collective_name, collective_reason

log = logging.getLogger(__name__)

COMPUTE_OPS = ("call_function", "call_method", "call_module")

# Targets where a Python scalar argument may be replaced by a 0-d tensor with the same result.
LIFTABLE_TARGETS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.where,
    torch.maximum, torch.minimum,
}
LIFTABLE_METHODS = {"add", "sub", "mul", "div", "pow", "__getitem__", "__add__", "__mul__", "__sub__",
                    "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__"}
# Tensor factories whose per-step variants are folded into a per-step input (computed once at rewrite).
FOLDABLE_TARGETS = {torch.tensor, torch.full, torch.ones, torch.zeros, torch.arange, torch.as_tensor,
                    torch.scalar_tensor, torch.linspace, torch.empty, torch.eye}
# Higher-order ops whose first argument is a body submodule that the chain may inline: activation
# checkpointing (`torch.utils.checkpoint`), which only trades memory for recomputation. The chain op keeps
# just the trajectory for its backward anyway.
INLINABLE_HOPS = {"tag_activation_checkpoint"}
# Attention ops taking `dropout_p` (query, key, value, attn_mask, dropout_p, ...): random unless it is 0.
ATTENTION_NAMES = {"scaled_dot_product_attention", "_scaled_dot_product_attention_math"}
RANDOM_NAMES = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
                "multinomial", "normal", "poisson", "uniform_", "normal_", "bernoulli_", "exponential_",
                "geometric_", "cauchy_", "log_normal_", "random_", "dropout", "dropout1d", "dropout2d",
                "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu", "native_dropout"}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor, operator.setitem,
                     operator.imatmul, operator.ilshift, operator.irshift}


@dataclass(frozen=True)
class ArgRef:
    """Where one leaf of a block node's arguments comes from.

    kind: "internal" (node `index` of the same block), "state" (carried state number `index`),
    "per_step" (per-step input group `index`), "invariant" (invariant input `index`), "symint" (symbolic
    size `index`, shared by every block: dynamic shapes), "lifted" (lifted constant `index`), "submodule"
    (inlined body `index`: each step has its own, all with the same graph), "const" (the literal, equal in
    every block).
    """

    kind: str
    index: int = -1


@dataclass(frozen=True)
class ChainMatch:
    """A validated chain. `blocks[i][j]` is node j of step i; everything else is derived from block 0."""

    blocks: tuple[tuple[Node, ...], ...]
    state_positions: tuple[int, ...]  # block positions whose outputs are the carried state
    initial: tuple[Node, ...]  # z_0, one node per carried state
    per_step: tuple[tuple[Node, ...], ...]  # per group: one node per step
    invariants: tuple[Node, ...]
    sym_invariants: tuple[Node, ...]  # symbolic ints (sizes under dynamic shapes) shared by every block
    lifted: tuple[tuple[object, ...], ...]  # per lifted constant: one Python value per step
    folded: tuple[int, ...]  # block positions computed from constants only, folded into per-step inputs
    arg_refs: tuple[tuple[ArgRef, ...], ...]  # per block position: one ref per flattened argument leaf
    # (step, block position) of the values read outside the chain, other than the last step's states
    exposed: tuple[tuple[int, int], ...] = ()
    # attribute names (in the graph's module) of block 0's inlined bodies (activation checkpointing)
    submodules: tuple[str, ...] = ()
    # Per-step slices of one tensor the model already holds stacked (`W[i]`, `W.select(0, i)`,
    # `W.unbind(0)[i]` with i = start + step): (block position, the stacked tensor's node, start). Each is a
    # per-step input passed as `source[start:start + L]` itself, no copy; its gradient is one (L, ...) tensor.
    sliced: tuple[tuple[int, Node, int], ...] = ()

    @property
    def length(self) -> int:
        return len(self.blocks)

    @property
    def nodes_per_step(self) -> int:
        return len(self.blocks[0])

    @property
    def first(self) -> Node:
        return self.blocks[0][0]

    @property
    def last(self) -> Node:
        return self.blocks[-1][-1]

    @property
    def kind(self) -> str:
        """"layers", "sampler", "recurrence" or "integrator": what the user wrote (see `chain_kind`)."""
        return chain_kind(self)

    @property
    def outputs(self) -> tuple[Node, ...]:
        """The last block's state nodes: the chain's results, in state order."""
        return tuple(self.blocks[-1][q] for q in self.state_positions)

    def state_values(self) -> list:
        return [n.meta.get("example_value", n.meta.get("val")) for n in self.initial]


# --- kinds ---------------------------------------------------------------------------------------------

SLICE_TARGETS = {operator.getitem, torch.select, "__getitem__", "select"}
UPDATE_TARGETS = {operator.add, torch.add, "add", "__add__", operator.sub, torch.sub, "sub", "__sub__"}
SCALE_TARGETS = {operator.mul, torch.mul, "mul", "__mul__", "__rmul__", operator.truediv, torch.div, "div",
                 "__truediv__"}


def _model_attribute(n: Node) -> bool:
    """A parameter or buffer of the model (Dynamo marks them static inputs), not an input of the call."""
    if n.op == "get_attr":
        return True
    return isinstance(_val(n), torch.nn.Parameter) or "_dynamo_static_input_type" in n.meta.get("tensor_dict", {})


def _step_slices(m: ChainMatch) -> tuple[set[int], set[int], bool]:
    """The lifted groups used as the index of a slice of an input tensor and of a parameter or buffer, and
    whether any step reads a slice of one input tensor indexed by the step: `x[:, t]` inside the step, or
    `x[:, t]` / `x.unbind(1)[t]` made before the chain and read as a per-step input."""
    block, inputs, attributes, sliced = m.blocks[0], set(), set(), False
    for n, refs in zip(block, m.arg_refs):
        if n.target in SLICE_TARGETS and refs and refs[0].kind == "invariant":
            lifted = {r.index for r in refs[1:] if r.kind == "lifted"}
            if _model_attribute(m.invariants[refs[0].index]):
                attributes |= lifted
            else:
                inputs |= lifted
                sliced |= bool(lifted)
    for group in m.per_step:
        if all(n.op in ("call_function", "call_method") and n.target in SLICE_TARGETS for n in group):
            sources = {n.args[0] for n in group}
            if len(sources) == 1:
                [src] = sources
                root = src.args[0] if not _is_tensor_node(src) and src.args and isinstance(src.args[0], Node) \
                    else src
                sliced |= not _model_attribute(root)
    for _, source, _ in m.sliced:  # `x[t]` / `x.unbind(0)[t]` of a sequence passed as its own stacked tensor
        sliced |= not _model_attribute(source)
    return inputs, attributes, sliced


def _is_integrator_update(m: ChainMatch) -> bool:
    """Every carried state is updated as `y + c * k` (or `y - c * k`, `y + k * c`, `y + k / c`), c a number and
    k computed in the step, possibly through several such updates (leapfrog's two half kicks)."""
    block = m.blocks[0]

    def number(j: int, li: int, ref: ArgRef) -> bool:
        return ref.kind == "lifted" or (ref.kind == "const" and type(_leaves(block[j])[li]) in (int, float))

    def scaled(j: int) -> bool:
        refs = m.arg_refs[j][:2]
        return block[j].target in SCALE_TARGETS and len(refs) == 2 and any(number(j, li, r) for li, r in
                                                                               enumerate(refs))

    def update(j: int, s: int, depth: int = 0) -> bool:
        refs = m.arg_refs[j][:2]
        if block[j].target not in UPDATE_TARGETS or len(refs) < 2 or depth > len(block):
            return False
        subtract = block[j].target in (operator.sub, torch.sub, "sub", "__sub__")
        for side in ((0,) if subtract else (0, 1)):
            y, k = refs[side], refs[1 - side]
            base = (y.kind == "state" and y.index == s) or (y.kind == "internal" and update(y.index, s, depth + 1))
            if base and k.kind == "internal" and scaled(k.index):
                return True
        return False

    return bool(m.state_positions) and all(update(q, s) for s, q in enumerate(m.state_positions))


def chain_kind(m: ChainMatch) -> str:
    """What the user wrote, read off the chain's structure; the solver is the same for every kind.

    - "recurrence": a cell over a sequence (`for t: h = cell(x[:, t], h)`): the steps read slices of one
      input tensor (not a parameter or buffer) indexed by the step, and no other per-step constants;
    - "integrator": an ODE step: no per-step tensors (the vector field is shared) and every carried state
      is updated as `y + c * k` with c a number (the step size), with or without per-step time constants
      (Euler, RK4, midpoint, Heun, leapfrog);
    - "sampler": diffusion steps: per-step constants (timesteps, schedule coefficients) lifted or folded
      into per-step inputs (`x = c1(t) * x + c2(t) * eps(x, t)`);
    - "layers": otherwise: a stack of layers, each with its own parameters (separate modules, or slices
      `self.w[i]` of a parameter indexed by the step).
    """
    inputs, attributes, sliced = _step_slices(m)
    only_indices = not m.folded and all(i in inputs | attributes for i in range(len(m.lifted)))
    if sliced and only_indices:
        return "recurrence"
    if not m.per_step and _is_integrator_update(m):
        return "integrator"
    if only_indices:  # no constants, or only the indices of per-step slices of parameters (`self.w[i]`)
        return "layers"
    return "sampler"


@dataclass(frozen=True)
class Declined:
    """A repeated region that is not rewritten, and why."""

    first: str
    last: str
    length: int
    nodes_per_step: int
    reason: str


@dataclass(frozen=True)
class Analysis:
    chains: tuple[ChainMatch, ...]
    declined: tuple[Declined, ...]
    # Declined candidates that read a value from two steps back: (blocks, (position, leaf) slots), for
    # `passes/carry.py`.
    lagged: tuple = ()


# --- signatures ---------------------------------------------------------------------------------------


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
    return repr(x)


def node_signature(n: Node) -> tuple:
    leaves, spec = tree_flatten((n.args, n.kwargs))
    val = n.meta.get("example_value", n.meta.get("val"))
    return (n.op, n.target if n.op != "call_module" else "module", str(spec), tuple(_leaf_sig(x) for x in leaves),
            _value_sig(val))


def _leaves(n: Node) -> list:
    return tree_flatten((n.args, n.kwargs))[0]


def _val(n: Node):
    return n.meta.get("example_value", n.meta.get("val"))


# --- eligibility --------------------------------------------------------------------------------------


# Node meta keys set by `passes/functionalize.py`: why it left an in-place op in place; and the nodes it
# moved to the end of the graph (running-statistics writes), which are never part of a chain.
KEPT_META = "pcr_kept_in_place"
DEFERRED_META = "pcr_deferred"


@functools.cache
def _signature(target) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except Exception:  # builtins and C extensions without a signature; unhashable targets miss the cache
        return None


def bound_arguments(n: Node) -> inspect.BoundArguments | None:
    """The call's arguments bound to its Python signature, defaults applied (None for ops without one)."""
    if n.op != "call_function":
        return None
    try:
        sig = _signature(n.target)
    except TypeError:  # unhashable target
        sig = None
    if sig is None:
        return None
    try:
        bound = sig.bind(*n.args, **n.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound


def mutates_in_place(n: Node) -> bool:
    """Whether `n` is an in-place op (`x += y`, `relu(x, inplace=True)` or `relu(x, True)`, `x.mul_(s)`,
    `torch.relu_(x)`, `torch.tanh(a, out=h)`, or batch/instance norm writing running statistics)."""
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target in INPLACE_OPERATORS or n.kwargs.get("out") is not None:
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return True
    bound = bound_arguments(n)
    if bound is None:  # torch.batch_norm / torch.instance_norm (no Python signature): assume they write
        return name in ("batch_norm", "instance_norm")
    args = bound.arguments
    if args.get("inplace") is True:
        return True
    # Training-mode normalisation with running statistics updates them in place.
    training = args.get("training", args.get("use_input_stats")) if name in ("batch_norm", "instance_norm") else None
    return bool(training) and args.get("running_mean") is not None


def keep_in_graph(n: Node) -> bool:
    """`is_impure_node` for dead-code elimination: FX's own check misses in-place methods and operators,
    whose results are often unused (`x.mul_(s)` as a statement) but whose effect is not."""
    return n.is_impure() or mutates_in_place(n)


def ineligibility(n: Node) -> str | None:
    """Why a node cannot be part of a chain solved out of order, or None."""
    if n.op == "call_module":
        return f"call_module node {n.name} (module calls are not inlined)"
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    if name in RANDOM_NAMES or (isinstance(name, str) and name.startswith("rand")):
        if name.startswith("dropout") or name in ("alpha_dropout", "feature_alpha_dropout", "rrelu"):
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            if training is False or p == 0:
                return None
        return f"random op {name} (node {n.name})"
    if name in ATTENTION_NAMES:
        p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
        if not (isinstance(p, (int, float)) and p == 0):
            return f"random op {name} with dropout_p={p} (node {n.name})"
    if mutates_in_place(n):
        kept = n.meta.get(KEPT_META)
        return f"in-place op {name} (node {n.name}{'; kept in place: ' + kept if kept else ''})"
    collective = collective_name(n)  # issue 17: FSDP's per-layer gathers and other collectives
    if collective is not None:
        return f"{collective_reason(collective)} (node {n.name})"
    if n.is_impure():
        return f"op with side effects {name} (node {n.name})"
    body = inlinable_body(n)
    if body is not None:
        for b in body.graph.nodes:
            if b.op == "get_attr":
                return f"checkpointed body {n.args[0].target} reads attribute {b.target}"
            if b.op in COMPUTE_OPS:
                why = ineligibility(b)
                if why:
                    return f"{why} inside {n.args[0].target}"
    return None


def inlinable_body(n: Node):
    """The body GraphModule of an inlinable higher-order op call (activation checkpointing), else None."""
    if n.op != "call_function" or getattr(n.target, "__name__", None) not in INLINABLE_HOPS:
        return None
    if not n.args or not isinstance(n.args[0], Node) or n.args[0].op != "get_attr":
        return None
    owner = n.graph.owning_module
    try:
        body = owner.get_submodule(n.args[0].target) if owner is not None else None
    except AttributeError:
        return None
    return body if isinstance(body, torch.fx.GraphModule) else None


def body_structure(gm: torch.fx.GraphModule) -> tuple:
    """A body graph's structure, independent of node names: equal structures compute the same function."""
    index = {}
    rows = []
    for i, b in enumerate(gm.graph.nodes):
        index[b] = i
        leaves, spec = tree_flatten((b.args, b.kwargs))
        args = tuple(("node", index[x]) if isinstance(x, Node) else repr(x) for x in leaves)
        rows.append((b.op, "" if b.op == "placeholder" else str(b.target), str(spec), args))
    return tuple(rows)


# --- candidate periods and phases -----------------------------------------------------------------------


# Candidate periods from the distances to the r-th next equal signature, r <= MULTIPLE_REPEATS: a step that
# evaluates one sub-module several times (an RK4 step calls its vector field 4 times, midpoint, Heun and
# leapfrog twice) repeats with the inner period inside and the step's period outside; the step's period is
# the distance to the 2nd..r-th next equal signature of the nodes in the inner repeat.
MULTIPLE_REPEATS = 8


def _periodic_regions(sig_ids: list[int], p: int, min_length: int) -> list[tuple[int, int, int]]:
    """(p, start, end) of the maximal regions [start, end) where sig[j] == sig[j + p], at least min_length
    blocks of p long. Plain Python (no tensors: this runs inside whatever device or fake-tensor mode the
    caller has set)."""
    runs, j = [], 0
    for same, group in itertools.groupby(a == b for a, b in zip(sig_ids, itertools.islice(sig_ids, p, None))):
        n = sum(1 for _ in group)
        if same and (n + p) // p >= min_length:  # region [j, j + n + p): every block of p repeats the previous
            runs.append((p, j, j + n + p))
        j += n
    return runs


def _candidate_runs(sig_ids: list[int], min_length: int,
                    max_periods: int = 32) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(period, start, end) of maximal regions [start, end) where sig[j] == sig[j + period], as two lists:
    periods that are the distance to the next equal signature, and periods that are only the distance to
    the 2nd..MULTIPLE_REPEATS-th next one (multiples of an inner repeat; tried where the first found
    nothing). O(N * MULTIPLE_REPEATS) to count the distances, O(N) per period to find the regions."""
    N = len(sig_ids)
    upcoming: dict[int, list[int]] = {}  # signature -> its next occurrences after j, nearest first
    near, far = Counter(), Counter()
    for j in range(N - 1, -1, -1):
        s = sig_ids[j]
        nxt = upcoming.setdefault(s, [])
        if nxt:
            near[nxt[0] - j] += 1
            for k in nxt[1:]:
                far[k - j] += 1
        nxt.insert(0, j)
        if len(nxt) > MULTIPLE_REPEATS:
            nxt.pop()
    need = max(1, min_length - 1)
    first = [p for p, c in near.most_common(max_periods) if c >= need]
    seen = set(first)
    multiples = [p for p, c in far.most_common() if c >= need and p not in seen][:max_periods]
    return ([r for p in first for r in _periodic_regions(sig_ids, p, min_length)],
            [r for p in multiples for r in _periodic_regions(sig_ids, p, min_length)])


def _best_phase(seq: list[Node], p: int, a: int, end: int, min_length: int) -> int:
    """Block-boundary offset in [0, p) with the fewest carried values that cannot be states (not floating
    tensors: a tuple such as an LSTM cell's (h, c) result), then the fewest values read from two blocks
    back (which no chain can carry: a boundary that puts a carried copy (`passes/carry.py`) in the wrong
    block), then the fewest carried values; ties go to the earliest."""
    best, best_cost = 0, None
    for phi in range(p):
        if (end - a - phi) // p < min_length:
            break
        A = set(seq[a + phi: a + phi + p])
        B = seq[a + phi + p: a + phi + 2 * p]
        before = set(seq[max(a, a + phi - p): a + phi])  # the run's nodes in the block before A
        carried = {x for n in B for x in n.all_input_nodes if x in A}
        far = {x for n in B for x in n.all_input_nodes if x in before}
        unfit = sum(not (_is_tensor_node(x) and _val(x).is_floating_point()) for x in carried)
        cost = (unfit, len(far), len(carried))
        if best_cost is None or cost < best_cost:
            best, best_cost = phi, cost
    return best


# --- validation ---------------------------------------------------------------------------------------


class _Split(Exception):
    """`pieces`: the sub-ranges of steps worth trying; `every_period`: the reason holds for any period of
    the same region (an ineligible op, autocast), so a multiple of the period is not worth trying."""

    def __init__(self, pieces: list[tuple[int, int]], reason: str, every_period: bool = False):
        self.pieces, self.reason, self.every_period = pieces, reason, every_period


class _Lagged(_Split):
    """The blocks read, at `slots` ((block position, argument leaf) pairs), a value of two steps back: a
    chain once `passes/carry.py` carries that value through the step between."""

    def __init__(self, blocks, slots: list[tuple[int, int]]):
        # Seen in a report only when `passes/carry.py` could not carry the value (or before it runs).
        super().__init__([], "steps read a value from two steps back, not carried through the step between")
        self.blocks, self.slots = blocks, slots


def _lag2_slots(rows: list[tuple]) -> list[tuple[int, int]]:
    """The (position, leaf) slots where steps 2.. read two steps back and step 1 reads an outside value, with
    every other reference the same in every step; [] when the blocks do not read so."""
    first, ref = rows[0], rows[1]
    if any(r != ref for r in rows[2:]):
        return []
    slots = []
    for j, (a_row, b_row) in enumerate(zip(first, ref)):
        for li, (a, b) in enumerate(zip(a_row, b_row)):
            if b[0] == "far":
                if b[2] != 2 or a != ("out",):
                    return []
                slots.append((j, li))
            elif a != b:
                return []
    return slots


def _is_tensor_node(n: Node) -> bool:
    return isinstance(_val(n), torch.Tensor)


def _same_tensor_meta(a: Node, b: Node) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype and va.device == vb.device)


def _liftable(n: Node, leaf_index: int) -> bool:
    if n.kwargs:
        n_pos = len(tree_flatten(n.args)[0])
        if leaf_index >= n_pos:
            return False
    if n.op == "call_function":
        return n.target in LIFTABLE_TARGETS
    return n.op == "call_method" and n.target in LIFTABLE_METHODS


def _autocast_nodes(graph: Graph) -> set[Node]:
    """Nodes inside `torch.autocast` regions (between Dynamo's _enter_autocast and _exit_autocast)."""
    inside, depth = set(), 0
    for n in graph.nodes:
        if n.op == "call_function" and n.target is getattr(torch.amp, "_enter_autocast", None):
            depth += 1
        elif n.op == "call_function" and n.target is getattr(torch.amp, "_exit_autocast", None):
            depth = max(depth - 1, 0)
        elif depth:
            inside.add(n)
    return inside




def _stacked_slice(blocks: list[tuple[Node, ...]], j: int, where: dict) -> tuple[Node, int] | None:
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
    if isinstance(_val(src), (tuple, list)):  # W.unbind(0)[i]: the stacked tensor is W
        if not ((src.op == "call_function" and src.target is torch.unbind) or
                (src.op == "call_method" and src.target == "unbind")):
            return None
        dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
        if dim != 0 or not isinstance(src.args[0], Node):
            return None
        source = src.args[0]
    val = _val(source)
    if not isinstance(val, torch.Tensor) or val.dim() < 1 or not isinstance(val.shape[0], int) \
            or idx[-1] >= val.shape[0]:
        return None
    return source, idx[0]


def _validate(blocks: list[tuple[Node, ...]], in_autocast: set[Node] = frozenset()) -> ChainMatch:
    """Validate blocks as a chain or raise _Split with the sub-ranges worth trying and the reason."""
    k = len(blocks)
    p = len(blocks[0])
    where = {n: (i, j) for i, blk in enumerate(blocks) for j, n in enumerate(blk)}
    for n in blocks[0]:
        why = ineligibility(n)
        if why:
            raise _Split([], f"block contains {why}", every_period=True)
    if any(n in in_autocast for blk in (blocks[0], blocks[-1]) for n in blk):
        # The chain op would run its steps without the autocast context that eager applies to them.
        raise _Split([], "inside a torch.autocast region (not supported yet; left to Inductor)", every_period=True)

    def tags(i: int):
        out = []
        for n in blocks[i]:
            row = []
            for x in _leaves(n):
                if isinstance(x, Node):
                    if x in where:
                        bi, q = where[x]
                        row.append(("internal", q) if bi == i else ("state", q) if bi == i - 1 else
                                   ("far", q, i - bi))
                    else:
                        row.append(("out",))
                else:
                    row.append(("c",))
            out.append(tuple(row))
        return tuple(out)

    ref = tags(1)
    if k >= 4 and tags(2) != ref:
        lagged = _lag2_slots([tags(i) for i in range(1, k)])
        if lagged:
            raise _Lagged(blocks, lagged)
    for i in range(2, k):
        if tags(i) != ref:
            raise _Split([(0, i), (i, k)], f"step {i} reads different values than step 1")
    t0 = tags(0)
    for j in range(p):
        for a, b in zip(t0[j], ref[j]):
            if a != b and not (b[0] == "state" and a == ("out",)):
                raise _Split([(1, k)], "the first step differs from the others")
    state_positions = tuple(sorted({t[1] for row in ref for t in row if t[0] == "state"}))
    if not state_positions:
        raise _Split([], "steps do not depend on each other (no carried state)")
    sidx = {q: s for s, q in enumerate(state_positions)}

    # Initial state: block 0's references at the state slots.
    initial: dict[int, Node] = {}
    for j in range(p):
        leaves0 = _leaves(blocks[0][j])
        for t, x in zip(ref[j], leaves0):
            if t[0] == "state":
                q = t[1]
                if initial.setdefault(q, x) is not x:
                    raise _Split([(1, k)], "the first step reads two different initial values for one state")
    for q, node in initial.items():
        if not _is_tensor_node(node) or not _same_tensor_meta(node, blocks[0][q]):
            raise _Split([(1, k)], f"the initial value {node.name} is not a tensor of the state's shape and dtype")
        if not _val(node).is_floating_point():
            raise _Split([], f"the carried state {node.name} is not a floating-point tensor")

    # Values used outside the chain. The last step's states are the op's results; any other value is
    # "exposed": a state of an earlier step is read from the solved trajectory, and any other node is
    # recomputed from the trajectory after the solve (outside users all come after the chain: blocks are
    # contiguous in graph order and only compute nodes and the output read values).
    exposed = []
    for i, blk in enumerate(blocks):
        for j, n in enumerate(blk):
            if i == k - 1 and j in sidx:
                continue
            if any(where.get(u, (-1,))[0] not in (i, i + 1) for u in n.users):
                exposed.append((i, j))

    # Outside references and constants, across blocks.
    per_step_groups: dict[tuple[Node, ...], int] = {}
    invariants: dict[Node, int] = {}
    sym_invariants: dict[Node, int] = {}
    lifted_groups: dict[tuple, int] = {}
    folded: list[int] = []
    submodules: dict[str, int] = {}
    sliced: list[tuple[int, Node, int]] = []
    arg_refs = []
    leaves_by_block = [[_leaves(n) for n in blk] for blk in blocks]
    for j in range(p):
        node0 = blocks[0][j]
        row_refs = []
        sl = _stacked_slice(blocks, j, where) if all((i, j) not in exposed for i in range(k)) else None
        if sl is not None:
            sliced.append((j, *sl))  # a per-step input: the template reads step l of the stacked tensor
            arg_refs.append(())
            continue
        const_differs = [
            li for li, t in enumerate(ref[j]) if t[0] == "c"
            and any(not _const_equal(leaves_by_block[i][j][li], leaves_by_block[0][j][li]) for i in range(1, k))
        ]
        fold = bool(const_differs) and node0.target in FOLDABLE_TARGETS and all(t[0] == "c" for t in ref[j])
        if fold:
            folded.append(j)
        for li, t in enumerate(ref[j]):
            if t[0] == "internal":
                row_refs.append(ArgRef("internal", t[1]))
            elif t[0] == "state":
                row_refs.append(ArgRef("state", sidx[t[1]]))
            elif t[0] == "far":
                raise _Split([], f"{node0.name} reads a value from more than one step back")
            elif t[0] == "out":
                nodes = tuple(leaves_by_block[i][j][li] for i in range(k))
                if all(x is nodes[0] for x in nodes):
                    if isinstance(_val(nodes[0]), torch.SymInt):
                        row_refs.append(ArgRef("symint", sym_invariants.setdefault(nodes[0], len(sym_invariants))))
                        continue
                    if not _is_tensor_node(nodes[0]):
                        raise _Split([], f"{node0.name} reads a non-tensor value {nodes[0].name}")
                    row_refs.append(ArgRef("invariant", invariants.setdefault(nodes[0], len(invariants))))
                else:
                    if li == 0 and all(inlinable_body(blocks[i][j]) is not None for i in range(k)):
                        bodies = [inlinable_body(blocks[i][j]) for i in range(k)]
                        first = body_structure(bodies[0])
                        differs = next((i for i in range(1, k) if body_structure(bodies[i]) != first), None)
                        if differs is None:
                            row_refs.append(ArgRef("submodule", submodules.setdefault(nodes[0].target,
                                                                                    len(submodules))))
                            continue
                        pieces = [(0, differs), (differs, k)] if differs > 1 else [(1, k)]
                        raise _Split(pieces, f"the checkpointed body {nodes[differs].target} of step {differs} "
                                             f"differs from {nodes[0].target}")
                    if not _is_tensor_node(nodes[0]):
                        what = "submodules (an activation checkpoint's body, say)" if nodes[0].op == "get_attr" \
                            else "non-tensor values"
                        raise _Split([], f"{node0.name} reads {what} that differ between steps "
                                         f"({nodes[0].name}, {nodes[1].name}, ...)")
                    for i, x in enumerate(nodes):
                        if not _same_tensor_meta(x, nodes[0]):
                            pieces = [(0, i), (i, k)] if i > 1 else [(1, k)]
                            raise _Split(pieces, f"per-step input {x.name} differs in shape or type from "
                                                 f"{nodes[0].name}")
                    row_refs.append(ArgRef("per_step", per_step_groups.setdefault(nodes, len(per_step_groups))))
            else:  # constant
                if li in const_differs and not fold:
                    values = tuple(leaves_by_block[i][j][li] for i in range(k))
                    if not (_liftable(node0, li) and all(type(v) in (int, float) for v in values)):
                        raise _Split([], f"constant argument {li} of {node0.name} differs between steps and "
                                         "cannot be lifted to a tensor")
                    row_refs.append(ArgRef("lifted", lifted_groups.setdefault(values, len(lifted_groups))))
                else:
                    row_refs.append(ArgRef("const"))
        arg_refs.append(tuple(row_refs))

    return ChainMatch(
        blocks=tuple(tuple(b) for b in blocks),
        state_positions=state_positions,
        initial=tuple(initial[q] for q in state_positions),
        per_step=tuple(per_step_groups),
        invariants=tuple(invariants),
        sym_invariants=tuple(sym_invariants),
        lifted=tuple(lifted_groups),
        folded=tuple(folded),
        arg_refs=tuple(arg_refs),
        exposed=tuple(exposed),
        submodules=tuple(submodules),
        sliced=tuple(sliced),
    )


def _const_equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return a is b


@dataclass(frozen=True)
class _Decline:
    """A declined candidate and where it lies: seq[lo:hi]; `short`: declined only for its length; `blanket`:
    declined for a reason every period of the region shares (or left to `passes/carry.py`)."""

    declined: Declined
    lo: int
    hi: int
    short: bool = False
    blanket: bool = False
    multiple: bool = False  # a period tried only as a multiple of an inner repeat


def _describe(blocks, reason: str) -> Declined:
    return Declined(first=blocks[0][0].name, last=blocks[-1][-1].name, length=len(blocks),
                    nodes_per_step=len(blocks[0]), reason=reason)


def _validate_region(seq: list[Node], start: int, p: int, k: int, min_length: int, chains: list,
                     declined: list[_Decline], in_autocast: set[Node], lagged: list) -> None:
    blocks = [tuple(seq[start + i * p: start + (i + 1) * p]) for i in range(k)]
    span = (start, start + p * k)
    if k < min_length:
        declined.append(_Decline(_describe(blocks, f"{k} steps < min_chain_length={min_length}"), *span, short=True))
        return
    try:
        chains.append(_validate(blocks, in_autocast))
    except _Lagged as e:
        declined.append(_Decline(_describe(blocks, e.reason), *span, blanket=True))
        lagged.append((e.blocks, tuple(e.slots)))
    except _Split as e:
        useful = [(a, b) for a, b in e.pieces if b - a >= min_length]
        if not useful:
            declined.append(_Decline(_describe(blocks, e.reason), *span, blanket=e.every_period))
        log.debug("candidate %s..%s (%d steps) split: %s", blocks[0][0].name, blocks[-1][-1].name, k, e.reason)
        for a, b in useful:
            _validate_region(seq, start + a * p, p, b - a, min_length, chains, declined, in_autocast, lagged)


def _summarise_declined(declined: list[_Decline], chain_spans: list[tuple[int, int]],
                        min_length: int) -> tuple[Declined, ...]:
    """The declined candidates worth reporting, in the order found: none inside a chain (sub-repeats tried
    before the chain's own period); a multiple period's only where no other period's was declined over it
    (that reason stands); and a short repeat inside a wider declined candidate (the 3-step repeats inside a
    transformer block declined for its dropout) counted in the widest one's reason, not listed."""
    def inside(d: _Decline, lo: int, hi: int) -> bool:
        return lo <= d.lo and d.hi <= hi

    kept = [d for d in declined if not any(inside(d, lo, hi) for lo, hi in chain_spans)]
    kept = [d for d in kept if not (d.multiple and any(not q.multiple and not q.short and q.lo < d.hi and d.lo < q.hi
                                                       for q in kept))]
    widest = sorted(kept, key=lambda d: d.lo - d.hi)
    parent = {id(d): next((q for q in widest if q is not d and q.hi - q.lo > d.hi - d.lo and inside(d, q.lo, q.hi)),
                          None) for d in kept if d.short}
    inner = Counter(id(q) for q in parent.values() if q is not None)
    result = []
    for d in kept:
        if parent.get(id(d)) is not None:
            continue
        n = inner[id(d)]
        reason = d.declined.reason if not n else (f"{d.declined.reason}; {n} shorter repeat{'s' * (n > 1)} "
                                                  f"inside, each < min_chain_length={min_length}")
        result.append(dataclasses.replace(d.declined, reason=reason))
    return tuple(result)


def find_chains(graph: Graph, min_length: int = 8) -> Analysis:
    """Find the chains of `graph` (read only). Chains are returned in graph order.

    Candidates are tried widest first; a candidate overlapping a chain already found is skipped. Periods
    that are multiples of an inner repeat (multi-stage integrator steps) are tried after the others, where
    those found no chain and did not decline the region for a reason every period shares."""
    seq = [n for n in graph.nodes if n.op in COMPUTE_OPS and not n.meta.get(DEFERRED_META)]
    interned: dict[tuple, int] = {}
    sig_ids = [interned.setdefault(node_signature(n), len(interned)) for n in seq]
    # Repeats from 3 steps up are candidates, so that shorter ones are reported as declined.
    shortest = min(3, min_length)
    in_autocast = _autocast_nodes(graph)
    occupied = [False] * len(seq)
    blanket = [False] * len(seq)  # declined for every period: multiples of the period are not tried there
    chains: list[ChainMatch] = []
    declined: list[_Decline] = []
    lagged: list = []
    for tier, runs in enumerate(_candidate_runs(sig_ids, shortest)):
        cands = []
        for p, a, end in runs:
            phi = _best_phase(seq, p, a, end, shortest)
            k = (end - a - phi) // p
            cands.append((p * k, p, a + phi, k))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        for _cover, p, start, k in cands:
            if any(occupied[start: start + p * k]) or (tier and any(blanket[start: start + p * k])):
                continue
            found: list[ChainMatch] = []
            n_declined = len(declined)
            _validate_region(seq, start, p, k, min_length, found, declined, in_autocast, lagged)
            for i, d in enumerate(declined[n_declined:], n_declined):
                declined[i] = dataclasses.replace(d, multiple=bool(tier))
                if d.blanket:
                    blanket[d.lo: d.hi] = [True] * (d.hi - d.lo)
            if tier and not found:  # the widest multiple of a region is the one tried
                blanket[start: start + p * k] = [True] * (p * k)
            for c in found:
                pos = {n: i for i, n in enumerate(seq[start: start + p * k], start)}
                lo, hi = pos[c.first], pos[c.last]
                for i in range(lo, hi + 1):
                    occupied[i] = True
            chains.extend(found)
    order = {n: i for i, n in enumerate(seq)}
    chains.sort(key=lambda c: order[c.first])
    for c in chains:
        log.debug("chain %s..%s: %d steps of %d nodes", c.first.name, c.last.name, c.length, c.nodes_per_step)
    spans = [(order[c.first], order[c.last] + 1) for c in chains]
    return Analysis(chains=tuple(chains), declined=_summarise_declined(declined, spans, min_length),
                    lagged=tuple(lagged))
