"""Per-chain decisions: solve in parallel or leave sequential, and with which Jacobian strategy.

The cost model is deliberately simple and explicit; every decision carries its reason, shown by
`pcr_compile.explain` and the inspection CLI. Measured facts it encodes (see DESIGN.md and
benchmarks/RESULTS.md): on CPU, Inductor's unrolled sequential code beats the parallel solve on every
chain we measured, so `mode="auto"` keeps CPU chains sequential; the parallel solve is a GPU effect.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .options import Options

RESIDUAL_TARGETS = {operator.add, torch.add, "add", "__add__"}
# A chain must be at least this long for "auto" to solve it in parallel on a GPU: below it, the fixed
# cost of a few batched iterations exceeds L sequential small kernels.
MIN_PARALLEL_LENGTH_GPU = 64
# Dense Jacobians cost w batched VJPs per iteration and w^3 per block product: small widths only (the
# Triton dense kernels keep blocks up to 64 x 64 on chip).
DENSE_MAX_WIDTH = 64


@dataclass(frozen=True)
class Decision:
    decision: str  # "parallel" | "sequential"
    jacobian: str  # dense | diagonal | identity | zero
    reason: str


def _hint(size) -> int:
    """A concrete size for the cost model; symbolic sizes (dynamic shapes) by their hint, without guarding."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 1
    return int(size)


def state_geometry(match) -> tuple[int, int]:
    """(rows B, features w) of the packed state, as the solver packs it."""
    vals = match.state_values()
    shapes = [tuple(_hint(s) for s in v.shape) for v in vals]
    leading = {s[0] if len(s) >= 2 else None for s in shapes}
    if len(leading) == 1 and None not in leading:
        return int(shapes[0][0]), sum(math.prod(s[1:]) for s in shapes)
    return 1, sum(math.prod(s) for s in shapes)


def is_residual(match) -> bool:
    """Every carried state is updated as `state + g(state)`, possibly through several residual branches
    (`x1 = x + a(x); x2 = x1 + m(x1)`, as in transformer blocks): the Jacobian is the identity plus the
    branches' Jacobians, so Picard (identity) iterations fit."""
    block = match.blocks[0]

    def residual_add(j: int, s: int, depth: int = 0) -> bool:
        node = block[j]
        if node.target not in RESIDUAL_TARGETS or depth > len(block):
            return False
        for r in match.arg_refs[j][:2]:
            if r.kind == "state" and r.index == s:
                return True
            if r.kind == "internal" and residual_add(r.index, s, depth + 1):
                return True
        return False

    return all(residual_add(q, s) for s, q in enumerate(match.state_positions))


def auto_jacobian(match, options: Options) -> tuple[str, str]:
    B, w = state_geometry(match)
    L = match.length
    elems = L * B * w * w
    if w <= DENSE_MAX_WIDTH and elems <= options.dense_budget:
        return "dense", f"dense Jacobians fit ({L}x{B}x{w}x{w} = {elems:,} elements <= dense_budget)"
    if is_residual(match):
        return "identity", f"residual block with a large state (w={w}): Picard, matrix-free"
    if match.lifted or match.folded:
        # Steps with per-step constants: samplers, and integrators / recurrences / layers indexed by the step
        # (their time constants or the step index are lifted); Picard as for samplers, whatever the kind.
        what = "sampler step" if match.kind == "sampler" else f"{match.kind} step with per-step constants,"
        return "identity", f"{what} with a large state (w={w}): Picard, matrix-free (as ParaDiGMS)"
    return "zero", f"state too large for dense Jacobians (w={w}) and not residual: Jacobi"


def decide(match, options: Options, device: torch.device) -> Decision:
    if options.jacobian == "auto":
        jac, why = auto_jacobian(match, options)
    else:
        jac, why = options.jacobian, f"jacobian={options.jacobian!r} forced"
    if options.mode == "sequential":
        return Decision("sequential", jac, "mode='sequential'")
    if options.mode == "parallel":
        return Decision("parallel", jac, f"mode='parallel'; {why}")
    if device.type != "cuda":
        return Decision("sequential", jac, f"auto on {device.type}: sequential code is faster off-GPU "
                                           "(use mode='parallel' to force)")
    if match.length < MIN_PARALLEL_LENGTH_GPU:
        return Decision("sequential", jac, f"auto: {match.length} steps < {MIN_PARALLEL_LENGTH_GPU}")
    if jac == "zero":
        return Decision("sequential", jac, "auto: no Jacobian strategy converges faster than sequential")
    return Decision("parallel", jac, f"auto on cuda; {why}")
