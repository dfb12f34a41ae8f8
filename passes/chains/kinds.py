"""What kind of loop a chain is (layers, sampler, recurrence, integrator), read off its structure, for reports."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..fx_utils import arg_leaves, is_tensor_node, node_value
from .match import ArgRef, ChainMatch
from .validate import SLICE_TARGETS

UPDATE_TARGETS = {operator.add, torch.add, "add", "__add__", operator.sub, torch.sub, "sub", "__sub__"}
SCALE_TARGETS = {operator.mul, torch.mul, "mul", "__mul__", "__rmul__", operator.truediv, torch.div, "div",
                 "__truediv__"}


def _model_attribute(n: Node) -> bool:
    """A parameter or buffer of the model (Dynamo marks them static inputs), not an input of the call."""
    if n.op == "get_attr":
        return True
    return isinstance(node_value(n), torch.nn.Parameter) or "_dynamo_static_input_type" in n.meta.get("tensor_dict", {})


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
                root = src.args[0] if not is_tensor_node(src) and src.args and isinstance(src.args[0], Node) \
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
        return ref.kind == "lifted" or (ref.kind == "const" and type(arg_leaves(block[j])[li]) in (int, float))

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
