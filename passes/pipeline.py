"""The graph passes the backend runs before it looks for chains, declared in order, each ``(gm, ctx) -> int``.

Every pass mutates ``gm.graph`` in place and returns how many sites it changed (0: the graph is as it was);
:func:`run_passes` runs a list of them, logs at debug level what each changed, and recompiles once at the end
when any changed anything. ``ctx`` carries what the passes share: the chain length the finder looks for, and
the finder's analysis when the last pass made one that still holds for the graph (so the backend does not
analyse the graph twice).

1. ``unroll_scans`` (``scan.py``): `torch.ops.higher_order.scan` nodes become their steps, each reading its
   slice of the scanned tensors;
2. ``detach_no_grad_regions`` (``grad_regions.py``): a `torch.no_grad()` region inside a step becomes its ops
   plus a `detach` of each value read after it, so the grad-mode markers no longer decline the block;
3. ``rewrite_fills`` (``fills.py``): `full_like(x, t)` / `x.new_full(size, t)` become a zero fill plus `t`,
   so a value that differs per step (an ODE's time) lifts like any other operand;
4. ``unit_slices_as_indices`` (``slices.py``): `x[:, t:t + 1]` becomes `x[:, t, None]`, so a step's `t`
   lifts as an index does;
5. ``hoist_random_draws`` (``random_draws.py``): noise drawn from shapes alone (`randn_like(x)` in a
   stochastic sampler's step) moves to the top of the graph, in order, when every draw can;
6. ``defer_running_stat_updates`` (``functionalize.py``): BatchNorm's running-statistics writes move to the
   end of the graph, out of the blocks;
7. ``functionalize_inplace`` (``functionalize.py``): private in-place ops become out of place;
8. ``defer_slice_writes`` (``functionalize.py``): writes into a preallocated output (`out[:, t] = h`, and
   accumulations `out[:, t] += h` into disjoint slices) move down to the output's first reader, out of the steps;
9. ``tensor_scalars`` (``scalars.py``): floats Dynamo passes as 0-d tensors and reads with `.item()` stay
   tensors where their users take tensors (a chain's per-step scalars are then batched);
10. ``carry_lagged_values`` (``carry.py``): values read two steps back are carried through the step between;
11. ``defer_integer_states`` (``defer.py``): integer states counted beside a floating chain move after it.

After them the backend finds chains (``chains/``), decides (``pcr_compile.cost``), and replaces each chosen chain
by its op (``rewrite.py``), then cleans up once (``fx_utils.cleanup``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, GraphModule

from .carry import carry_lagged_values
from .chains import Analysis
from .defer import defer_integer_states
from .fills import rewrite_fills
from .functionalize import defer_running_stat_updates, defer_slice_writes, functionalize_inplace
from .grad_regions import detach_no_grad_regions
from .random_draws import hoist_random_draws
from .scalars import tensor_scalars
from .scan import unroll_scans
from .slices import unit_slices_as_indices

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    min_length: int  # the shortest chain the finder reports (Options.min_chain_length)
    analysis: Analysis | None = None  # the finder's analysis of the graph as it is now, when a pass made one


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[GraphModule, PassContext], int]


def on_graph(name: str, fn: Callable[[Graph], int]) -> GraphPass:
    """A pass that needs only the graph: `fn(gm.graph) -> sites changed`."""
    return GraphPass(name, lambda gm, ctx: fn(gm.graph))


def _carry(gm: GraphModule, ctx: PassContext) -> int:
    carried, analysis = carry_lagged_values(gm.graph, min_length=ctx.min_length)
    ctx.analysis = None if carried else analysis  # carrying changed the graph the analysis was made on
    return carried


def _defer_integers(gm: GraphModule, ctx: PassContext) -> int:
    moved, analysis = defer_integer_states(gm.graph, min_length=ctx.min_length, analysis=ctx.analysis)
    ctx.analysis = None if moved else analysis
    return moved


PREPARE: tuple[GraphPass, ...] = (
    on_graph("unroll_scans", unroll_scans),
    on_graph("detach_no_grad_regions", detach_no_grad_regions),
    on_graph("rewrite_fills", rewrite_fills),
    on_graph("unit_slices_as_indices", unit_slices_as_indices),
    on_graph("hoist_random_draws", hoist_random_draws),
    on_graph("defer_running_stat_updates", defer_running_stat_updates),
    on_graph("functionalize_inplace", functionalize_inplace),
    on_graph("defer_slice_writes", defer_slice_writes),
    on_graph("tensor_scalars", tensor_scalars),
    GraphPass("carry_lagged_values", _carry),
    GraphPass("defer_integer_states", _defer_integers),
)


def run_passes(gm: GraphModule, passes: tuple[GraphPass, ...], ctx: PassContext) -> int:
    """Run `passes` in order on `gm`; recompile once if any changed the graph. Returns the total changed."""
    total = 0
    for p in passes:
        n = p.run(gm, ctx)
        if n:
            log.debug("%s: %d change%s", p.name, n, "s" * (n != 1))
        total += n
    if total:
        gm.recompile()
    return total
