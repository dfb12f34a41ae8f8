"""Which nodes can be part of a chain solved out of order: no randomness, no in-place mutation, no side effects,
no module calls; activation-checkpointed bodies are inlined when their own nodes are eligible."""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.utils._pytree import tree_flatten

from ..functionalize import KEPT_META
from ..fx_utils import COMPUTE_OPS, mutates_in_place
from .collectives import collective_name, collective_reason

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


def target_name(n: Node) -> str:
    """The op's name: a method's name, a function's `__name__` (its string form where it has none)."""
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def random_reason(n: Node) -> str | None:
    """Why `n` draws random numbers ("random op ..."), or None when it does not (dropout in eval mode or
    with p = 0 does not)."""
    name = target_name(n)
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
    return None


def ineligibility(n: Node) -> str | None:
    """Why a node cannot be part of a chain solved out of order, or None."""
    if n.op == "call_module":
        return f"call_module node {n.name} (module calls are not inlined)"
    name = target_name(n)
    why = random_reason(n)
    if why:
        return why
    if mutates_in_place(n):
        kept = n.meta.get(KEPT_META)
        return f"in-place op {name} (node {n.name}{'; kept in place: ' + kept if kept else ''})"
    collective = collective_name(n)  # FSDP's per-layer gathers and other collectives (issue 17)
    if collective is not None:
        return f"{collective_reason(collective)} (node {n.name})"
    if n.is_impure() and not is_autocast_marker(n):
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


def is_autocast_marker(n: Node) -> bool:
    """Dynamo's `torch.autocast` region markers (`torch.amp._enter_autocast` / `_exit_autocast`): side effects
    on the autocast state only, which a step may open and close within itself (the template copies them)."""
    return n.op == "call_function" and n.target in (getattr(torch.amp, "_enter_autocast", None),
                                                    getattr(torch.amp, "_exit_autocast", None))


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
