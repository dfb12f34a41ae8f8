"""Per-chain decisions: solve in parallel or leave sequential, and with which Jacobian strategy.

The cost model is deliberately simple and explicit; every decision carries its reason, shown by
`pcr_compile.explain` and the inspection CLI. Measured facts it encodes (see DESIGN.md and
benchmarks/RESULTS.md): on CPU, Inductor's unrolled sequential code beats the parallel solve on every
chain we measured, so `mode="auto"` keeps CPU chains sequential; the parallel solve is a GPU effect.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .kernels.settings import MAX_DENSE_W
from .options import Options

RESIDUAL_TARGETS = {operator.add, torch.add, "add", "__add__"}
# A residual sum scaled by a number, `(x + g(x)) / output_scale_factor` (diffusers' ResnetBlock2D): still the
# identity (times a constant) plus the branch's Jacobian.
SCALE_TARGETS = {operator.truediv, operator.mul, torch.div, torch.mul, "div", "mul", "__truediv__", "__mul__"}


@dataclass(frozen=True)
class GpuModel:
    """`mode="auto"` on CUDA: a launch-bound model of both ways to run a chain. A MODEL: its constants are
    assumptions until a GPU measures them (then replace them here, with device, commit and date).

    sequential:  L x n launches                        (n: the block's ops, one kernel each)
    parallel:    k x ((n + j + pcr + check) launches + 1 host sync)
                 k: iterations predicted for the strategy; j: launches of the Jacobian (dense: the VJPs of
                 the block, about 2n; the others 0); pcr: the linear solve; check: the residual's ops
    The chain is solved in parallel when the prediction is at least `speedup` times faster; a solve that then
    takes more iterations than predicted is caught at run time (solver/auto_switch.py).
    """

    launch_us: float = 4.0  # host cost of one kernel launch (PyTorch eager on an H200): assumed
    sync_us: float = 10.0  # one device-to-host read: assumed
    pcr_launches: int = 3  # chunked scan: summaries, carries, rescan
    check_launches: int = 4  # residual, its step maxima, the prefix read
    speedup: float = 1.5
    # Newton converges in 3-5 iterations on the MLPs measured (benchmarks/RESULTS.md); quasi-Newton and Picard
    # in 8-15 on MLPs, ResNets and trained samplers; Jacobi in ~L.
    iterations: tuple[tuple[str, int], ...] = (("dense", 6), ("diagonal", 12), ("identity", 16))

    def predict(self, match, jacobian: str) -> tuple[float, float, str]:
        """(parallel us, sequential us, the arithmetic as text) for `match` with strategy `jacobian`."""
        L, n = match.length, max(match.nodes_per_step, 1)
        k = min(dict(self.iterations).get(jacobian, L), L)
        j = 2 * n if jacobian in ("dense", "diagonal") else 0
        per_iter = n + j + self.pcr_launches + self.check_launches
        par = k * (per_iter * self.launch_us + self.sync_us)
        seq = L * n * self.launch_us
        text = (f"predicted parallel {par:,.0f} us = {k} iterations x ({per_iter} launches x {self.launch_us:g} us + "
                f"1 sync x {self.sync_us:g} us) against sequential {seq:,.0f} us = {L} steps x {n} launches x "
                f"{self.launch_us:g} us (a launch-bound model with assumed constants; parallel when "
                f">= {self.speedup:g}x faster)")
        return par, seq, text


GPU_MODEL = GpuModel()
# Dense Jacobians cost w batched VJPs per iteration and w^3 per block product: small widths only, up to the
# widest block the Triton dense kernels keep on chip.
DENSE_MAX_WIDTH = MAX_DENSE_W


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
    from .solver.call import packed_geometry

    _, B, sizes = packed_geometry([tuple(_hint(s) for s in v.shape) for v in match.state_values()])
    return B, sum(sizes)


def is_residual(match) -> bool:
    """Every carried state is updated as `state + g(state)`, possibly through several residual branches
    (`x1 = x + a(x); x2 = x1 + m(x1)`, as in transformer blocks), or such a sum scaled by a number
    (`(x + g(x)) / c`): the Jacobian is the identity (times a constant) plus the branches' Jacobians, so
    Picard (identity) iterations fit."""
    block = match.blocks[0]

    def residual_add(j: int, s: int, depth: int = 0) -> bool:
        node = block[j]
        if depth > len(block):
            return False
        refs = match.arg_refs[j]
        if node.target in SCALE_TARGETS and len(refs) == len(node.args) == 2 and refs[0].kind == "internal" \
                and type(node.args[1]) in (int, float):  # (block 0's number, when it is lifted)
            return residual_add(refs[0].index, s, depth + 1)
        if node.target not in RESIDUAL_TARGETS:
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
    if jac == "zero":
        return Decision("sequential", jac, "auto: no Jacobian strategy converges faster than sequential")
    par, seq, text = GPU_MODEL.predict(match, jac)
    if seq >= GPU_MODEL.speedup * par:
        return Decision("parallel", jac, f"auto on cuda: {text}; {why}")
    return Decision("sequential", jac, f"auto on cuda: {text}")
