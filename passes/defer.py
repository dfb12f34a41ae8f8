"""Move the integer part of a step after the chain, so that the floating part of the steps forms one.

A loop that counts while it computes -- `h = cell(x[:, t], h); n = n + (h[:, 0] > 0).long()` (an RNN's
active steps, a halting counter) -- carries an integer state beside the floating one. The solve is
Newton's on floating states, so the finder declines such a run (`Analysis.integer_runs`: the blocks and
the integer states' block positions). Where no floating value of the run depends on the integer states,
this pass moves every node that does (the integer states' own updates, and what reads them) after the
run's last node, in their order. The floating part is then a chain; the integer part reads its per-step
values (`(h[:, 0] > 0).long()`, or `h` itself) after it, as any later reader of a chain's earlier steps
does (the rewrite recomputes them from the solved trajectory), and is evaluated there as ordinary graph
code. Runs whose floating part reads an integer state (a step that indexes with its counter) are left as
they are: still declined, for the same reason.

So are runs whose steps compute in a lower precision under torch.autocast. A counter of `h > 0` read off
the solved trajectory equals eager's where no value lies within the solve's error of the threshold: at
float32's tolerance (1e-6 of the step's size) that is a rare tie, at bfloat16's (2e-3) it is not (an
RNN's count of positive steps was off by one in seven rows). Moving nodes out of a step's own autocast
region would also change their casts; where no value is cast down, autocast changes nothing they compute.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .chains import Analysis, find_chains
from .chains.validate import autocast_states, cast_dtype
from .fx_utils import node_value


def _integer_part(blocks, positions) -> set[Node] | None:
    """The nodes of the run that depend on its integer states (the states' nodes and what reads them, in
    the run), or None when every state the steps carry is among them: the floating states read the integer
    ones (a counter that scales the next input), so nothing would be left to solve."""
    members = [n for blk in blocks for n in blk]
    part = {blk[q] for blk in blocks for q in positions}
    for n in members:  # blocks are contiguous and in graph order: readers come after what they read
        if n not in part and any(a in part for a in n.all_input_nodes):
            part.add(n)
    if len(blocks) < 3:
        return None
    nxt = set(blocks[2])  # step 1's carried states (step 0 reads the initial values, outside the run)
    carried = [n for n in blocks[1] if any(u in nxt for u in n.users)]
    if all(n in part for n in carried):
        return None
    return part


def _casts_down(nodes: list[Node], states: dict) -> bool:
    """Whether torch.autocast casts a value of these nodes down: one has the dtype of an enabled autocast
    context it runs in, for its device."""
    for n in nodes:
        v = node_value(n)
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            continue
        if any(cast_dtype(c, v.device.type) == v.dtype for c in states.get(n, ())):
            return True
    return False


def defer_integer_states(graph: Graph, min_length: int = 8, analysis: Analysis | None = None) -> tuple[int, Analysis]:
    """Move the integer part of every run `find_chains` reports as carrying integer states after the run.
    Returns how many runs were changed and the analysis it used, which still holds for `graph` when none
    was."""
    analysis = analysis if analysis is not None else find_chains(graph, min_length=min_length)
    changed = 0
    done: set[Node] = set()
    states = autocast_states(graph) if analysis.integer_runs else {}
    for run in analysis.integer_runs:
        blocks = run.blocks
        if any(n in done for blk in blocks for n in blk):
            continue  # overlaps a run already changed
        part = _integer_part(blocks, run.positions)
        if not part:
            continue
        if _casts_down([n for blk in blocks for n in blk], states):
            continue  # under autocast: left declined, evaluated in order (see the module docstring)
        anchor = blocks[-1][-1]
        while anchor in part:  # the run's last floating node: the integer part goes after it
            anchor = anchor.prev
        for n in [m for blk in blocks for m in blk if m in part]:
            anchor.append(n)
            anchor = n
        done.update(n for blk in blocks for n in blk)
        changed += 1
    return changed, analysis
