"""Collectives inside a chain's step: found in the FX graph so the finder declines the chain, naming them.

A block whose parameters are gathered per layer (FSDP2's `fully_shard` traced with its hooks, FSDP1 under
`use_orig_params`, tensor-parallel DTensor layers) calls a collective in every step. A chain solve
evaluates all steps of the chain at once and a varying number of times per call (Newton iterations,
a sequential fallback), so a collective inside a step would be issued a data-dependent number of times,
in a different order on each rank, or under `vmap`: such chains are declined (a `Declined` with the
collective's name), and Inductor compiles them as usual.

What a user can do instead: shard outside the chain (wrap the whole chain in one FSDP unit, so its
parameters are gathered once before it: `fully_shard(model.layers)` rather than per layer), keep the
chain's small parameters replicated (DDP, or FSDP's `ignored_params`), or split the chain over ranks
layer-parallel (`pcr_compile.distributed.layer_parallel`). (Here, beside the other eligibility rules,
because ``passes/`` depends on nothing above it.)
"""

from __future__ import annotations

from torch.fx import Node

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d", "fsdp",
                         "_dtensor", "symm_mem")


def collective_name(node: Node) -> str | None:
    """`namespace.op` when `node` calls a torch.distributed collective (or FSDP's copy-in/out ops)."""
    if node.op != "call_function":
        return None
    target = node.target
    packet = getattr(target, "overloadpacket", target)  # OpOverload -> its packet; a packet is itself
    qualified = getattr(packet, "_qualified_op_name", None)
    if isinstance(qualified, str) and "::" in qualified:
        ns, op = qualified.split("::", 1)
        if ns in COLLECTIVE_NAMESPACES:
            return f"{ns}.{op}"
    module = getattr(target, "__module__", "") or ""
    if module.startswith("torch.distributed"):
        return f"{module}.{getattr(target, '__name__', str(target))}"
    return None


def collective_reason(name: str) -> str:
    return (f"step calls the collective {name} (parameters gathered per layer, e.g. FSDP): a chain solve would "
            "issue it a data-dependent number of times; shard outside the chain or keep its parameters replicated")
