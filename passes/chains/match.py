"""The typed results of the chain finder: where each argument of a step comes from (:class:`ArgRef`), a validated
chain (:class:`ChainMatch`), a declined candidate (:class:`Declined`), a run left to ``passes/carry.py``
(:class:`LaggedRun`) and the analysis of one graph (:class:`Analysis`). Plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.fx import Node

from ..fx_utils import node_value

# Where an argument leaf of a step's node comes from (ArgRef.kind): the one vocabulary of the finder's result.
RefKind = Literal["internal", "state", "per_step", "invariant", "symint", "lifted", "submodule", "const"]
REF_KINDS: tuple[str, ...] = RefKind.__args__


@dataclass(frozen=True)
class ArgRef:
    """Where one leaf of a block node's arguments comes from.

    kind: "internal" (node `index` of the same block), "state" (carried state number `index`),
    "per_step" (per-step input group `index`), "invariant" (invariant input `index`), "symint" (symbolic
    size `index`, shared by every block: dynamic shapes), "lifted" (lifted constant `index`), "submodule"
    (inlined body `index`: each step has its own, all with the same graph), "const" (the literal, equal in
    every block).
    """

    kind: RefKind
    index: int = -1

    def __post_init__(self):
        if self.kind not in REF_KINDS:
            raise ValueError(f"ArgRef.kind must be one of {REF_KINDS}, got {self.kind!r}")


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
    # The torch.autocast contexts every step runs in, outermost first (``validate.autocast_states``): the
    # template enters them, so the chain op's evaluations cast as eager's do. () outside autocast.
    autocast: tuple[tuple, ...] = ()

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
        """"layers", "sampler", "recurrence" or "integrator": what the user wrote (see `kinds.chain_kind`)."""
        from .kinds import chain_kind

        return chain_kind(self)

    @property
    def outputs(self) -> tuple[Node, ...]:
        """The last block's state nodes: the chain's results, in state order."""
        return tuple(self.blocks[-1][q] for q in self.state_positions)

    def state_values(self) -> list:
        return [node_value(n) for n in self.initial]


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
    lagged: tuple[LaggedRun, ...] = ()  # declined candidates that read a value from two steps back
    # declined candidates that carry an integer or boolean state beside a floating one (passes/defer.py)
    integer_runs: tuple[IntegerRun, ...] = ()


@dataclass(frozen=True)
class LaggedRun:
    """A candidate whose steps read a value of two steps back at ``slots`` ((block position, argument leaf)
    pairs): a chain once ``passes/carry.py`` carries that value through the step between."""

    blocks: tuple[tuple[Node, ...], ...]
    slots: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class IntegerRun:
    """A candidate that carries integer or boolean states (at block positions ``positions``) beside floating
    ones: a chain of the floating part once ``passes/defer.py`` moves the integer part after it."""

    blocks: tuple[tuple[Node, ...], ...]
    positions: tuple[int, ...]
