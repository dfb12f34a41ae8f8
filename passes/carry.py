"""Carry values read two steps back through the step between, so that such blocks form chains.

A block that reads a value of two steps back -- `x, prev = f(x) + 0.5 * prev, x` (momentum ResNets,
leapfrog and Verlet integrators) -- is not a first-order chain: step i reads step i-1 and step i-2. The
chain finder reports such runs (`Analysis.lagged`: the blocks and the argument slots that read two steps
back). This pass gives every block i a copy `c_i = v.clone()` of the value that block i+1 reads there
(block i-1's node, or for block 0 the outside value block 1 reads), placed at the end of block i (so
that every block boundary the finder may choose keeps it one step from its reader), and points block
i+1's slot at it. Step i+1 then reads only step i: the copy is carried state like any
other, and the chain is found, solved and differentiated as usual. The copy costs one clone per step.
"""

from __future__ import annotations

from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten, tree_unflatten

from .chains import Analysis, find_chains


def _leaf(n: Node, li: int):
    return tree_flatten((n.args, n.kwargs))[0][li]


def _set_leaf(n: Node, li: int, value: Node) -> None:
    leaves, spec = tree_flatten((n.args, n.kwargs))
    leaves[li] = value
    n.args, n.kwargs = tree_unflatten(leaves, spec)


def carry_lagged_values(graph: Graph, min_length: int = 8) -> tuple[int, Analysis]:
    """Insert the carried copies for every run `find_chains` reports as reading two steps back. Returns how
    many runs were changed and the analysis it made, which still holds for `graph` when none was."""
    analysis = find_chains(graph, min_length=min_length)
    done: set[Node] = set()
    changed = 0
    for run in analysis.lagged:
        blocks, slots = run.blocks, run.slots
        if any(n in done for blk in blocks for n in blk):
            continue  # overlaps a run already changed (another period of the same repeat)
        k = len(blocks)
        # One copy per distinct source position: q, the block position read two steps back.
        sources: dict[int, list[tuple[int, int]]] = {}
        for j, li in slots:  # block 2 reads block 0's node q there
            q = blocks[0].index(_leaf(blocks[2][j], li))
            sources.setdefault(q, []).append((j, li))
        # Block 1 must read one outside value per source position (block 0's copy of it).
        outside = {}
        for q, qs in sources.items():
            firsts = {_leaf(blocks[1][j], li) for j, li in qs}
            if len(firsts) != 1:
                break
            outside[q] = firsts.pop()
        else:
            for q, qs in sources.items():
                copies = []
                for i in range(k):  # c_i: what block i + 1 reads (block k would read blocks[k - 1][q])
                    src = outside[q] if i == 0 else blocks[i - 1][q]
                    with graph.inserting_after(blocks[i][-1]):
                        c = graph.call_method("clone", (src,))
                    c.meta.update({key: v for key, v in src.meta.items() if key in ("example_value", "val")})
                    copies.append(c)
                for i in range(1, k):
                    for j, li in qs:
                        _set_leaf(blocks[i][j], li, copies[i - 1])
            done.update(n for blk in blocks for n in blk)
            changed += 1
    return changed, analysis

