"""The `deeppcr` torch.compile backend: find chains, decide, rewrite, hand the graph to Inductor.

    torch.compile(model, backend="deeppcr", options={...})

One entry function, one fallback: options are parsed into a frozen :class:`Options` (unknown keys and
bad values raise `ValueError`); an internal error logs a warning with the traceback and compiles the
*original* graph with Inductor, unless `strict=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from dataclasses import asdict, dataclass

import torch
from torch.fx import Graph, GraphModule

from pcr_compile.passes.chains import Analysis, ChainMatch, find_chains
from pcr_compile.passes.chains.validate import autocast_compute_dtype
from pcr_compile.passes.fills import rewritable_fill
from pcr_compile.passes.fx_utils import cleanup, mutates_in_place, node_value
from pcr_compile.passes.grad_regions import opens_no_grad
from pcr_compile.passes.pipeline import PREPARE, PassContext, run_passes
from pcr_compile.passes.random_draws import has_random_draws
from pcr_compile.passes.rewrite import build_template, rewrite_chain
from pcr_compile.passes.scalars import has_tensor_scalars
from pcr_compile.passes.scan import scan_nodes
from pcr_compile.passes.slices import rewritable_slice
from pcr_compile.passes.structure import linear_pointwise

from .cost import Decision, decide
from .options import MODES, Options, inductor_modes
from .runtime import ops
from .solver import ChainSpec

log = logging.getLogger(__name__)

if torch.distributed.is_available():  # DDP: Dynamo's default split deferred to deeppcr (distributed/ddp.py)
    from .distributed.ddp import install_ddp_hook

    install_ddp_hook()


@dataclass(frozen=True)
class PlannedChain:
    match: ChainMatch
    decision: Decision


@dataclass(frozen=True)
class GraphPlan:
    chains: tuple[PlannedChain, ...]
    declined: tuple  # passes.chains.Declined


def plan_graph(gm: GraphModule, options: Options, analysis: Analysis | None = None) -> GraphPlan:
    """Analysis (made here unless given) and decisions for one graph; does not mutate it."""
    if analysis is None:
        analysis = find_chains(gm.graph, min_length=options.min_chain_length)
    planned = []
    for m in analysis.chains:
        device = m.state_values()[0].device
        planned.append(PlannedChain(m, decide(m, options, device)))
    return GraphPlan(tuple(planned), analysis.declined)


def _trace_plan(plan: GraphPlan, names: list[str]) -> None:
    """Emit the plan as a structured trace artifact (TORCH_TRACE=dir, then tlparse, shows it)."""
    from .reports import chain_report

    def payload():
        return json.dumps({
            "chains": [asdict(chain_report(0, pc)) for pc in plan.chains],
            "declined": [asdict(d) for d in plan.declined],
            "chain_ops": names,
        })

    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": "pcr_compile_chains", "encoding": "json"}, payload_fn=payload)


def _needs_grad(match: ChainMatch) -> bool:
    """Whether autograd may flow back through the chain. Its results' example values say so where they are known:
    they carry the grad mode at the chain's place in the graph, which a `torch.enable_grad()` / `no_grad()` block
    inside the compiled code sets apart from the mode around the call (an enable_grad block compiled under
    no_grad was rewritten without its trajectory, and Inductor's compile failed on the op's backward)."""
    vals = [node_value(n) for n in match.outputs]
    if vals and all(isinstance(v, torch.Tensor) for v in vals):
        return any(v.requires_grad for v in vals)
    if not torch.is_grad_enabled():
        return False
    nodes = [*match.initial, *(n for g in match.per_step for n in g), *(src for _, src, _ in match.sliced),
             *match.invariants]
    return any(getattr(node_value(n), "requires_grad", False) for n in nodes)


def chain_spec(match: ChainMatch) -> ChainSpec:
    t = build_template(match)
    # The op's schema version is part of its name: Inductor's on-disk cache stores compiled graphs that
    # call ops by name, and a cached graph must never call an op whose arguments have changed since.
    # The compute dtype is too: the op's spec (its default tolerance) is the first one registered under the
    # name, and one template's code serves a float32 state cast to bfloat16 and a float64 state autocast leaves.
    compute = autocast_compute_dtype(match)
    name = "chain_" + hashlib.sha1(f"{t.key}/{ops.SCHEMA_KEY}/{compute}".encode()).hexdigest()[:16]
    return ChainSpec(name=name, template=t.gm, n_state=t.n_state, n_per_step=t.n_per_step,
                     n_consts=t.n_consts, n_invariants=t.n_invariants, n_syms=t.n_syms, kind=match.kind,
                     lp=linear_pointwise(t.gm, t.n_state, t.n_per_step), compute_dtype=compute)


def copy_graph_module(gm: GraphModule) -> GraphModule:
    g = Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return GraphModule(gm, g, class_name=type(gm).__name__)


def prepared(gm: GraphModule, options: Options, copy: bool = True) -> tuple[GraphModule, GraphPlan]:
    """The copy of a Dynamo graph that chains are found in, and its plan. In the copy, BatchNorm's
    running-statistics updates are moved to the end, private in-place ops rewritten out of place and writes into
    a preallocated output moved to its first reader (`passes/functionalize.py`), values read two steps back are
    carried through the step between (`passes/carry.py`), integer states counted beside a chain moved after it
    (`passes/defer.py`), scan nodes unrolled (`passes/scan.py`), literal fills made adds (`passes/fills.py`),
    unit slices by a number made indices (`passes/slices.py`), shape-only random draws moved to the top
    (`passes/random_draws.py`), floats read back from 0-d tensors kept as tensors (`passes/scalars.py`) and
    `no_grad` regions made detaches (`passes/grad_regions.py`): the passes of `passes/pipeline.py`. With
    `copy=False`, a graph that none of those passes would change (no in-place op, no scan node, no fill, no unit
    slice, no random draw, no `no_grad` region, no `.item()` of a float, no read two steps
    back, no integer state beside a chain) is analysed where it is, read only, and returned itself: deciding to
    change nothing then costs no copy of the graph (half the backend's time on a 1,000-node graph)."""
    rewritable = (mutates_in_place, rewritable_fill, rewritable_slice, opens_no_grad)
    if not copy and not scan_nodes(gm.graph) and not has_random_draws(gm.graph) and not has_tensor_scalars(
            gm.graph) and not any(f(n) for n in gm.graph.nodes for f in rewritable):
        analysis = find_chains(gm.graph, min_length=options.min_chain_length)
        if not analysis.lagged and not analysis.integer_runs:
            return gm, plan_graph(gm, options, analysis)
    new = copy_graph_module(gm)
    ctx = PassContext(min_length=options.min_chain_length)
    run_passes(new, PREPARE, ctx)
    return new, plan_graph(new, options, ctx.analysis)


def _may_rewrite(gm: GraphModule, options: Options) -> bool:
    """Whether `decide` can choose "parallel" for a chain of `gm`: "parallel" always, "sequential" never,
    "auto" only on CUDA (cost.decide). Decides whether the graph is copied before it is analysed, so that a
    rewrite analyses once and a graph left alone is not copied at all."""
    if options.mode != "auto":
        return options.mode == "parallel"
    vals = (node_value(n) for n in gm.graph.nodes if n.op == "placeholder")
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in vals)


def rewrite(gm: GraphModule, options: Options) -> tuple[GraphModule, GraphPlan, list[str]]:
    """A rewritten copy of `gm` with every chain decided "parallel" replaced by its chain op (`gm` itself when
    none is); chains are found in the prepared copy (`prepared`)."""
    new, plan = prepared(gm, options, copy=_may_rewrite(gm, options))
    chosen = [pc for pc in plan.chains if pc.decision.decision == "parallel"]
    if chosen and new is gm:  # analysed in place, yet a chain was chosen: rewrite a copy, found again there
        new, plan = prepared(gm, options)
        chosen = [pc for pc in plan.chains if pc.decision.decision == "parallel"]
    specs = [chain_spec(pc.match) for pc in chosen]  # every check before the first mutation
    names = []
    replaced: dict = {}  # nodes an earlier rewrite rerouted, which later matches may name
    for i, (pc, spec) in enumerate(zip(chosen, specs)):
        op = ops.get_chain_op(spec)
        rewrite_chain(new, pc.match, op, ops.chain_call_args, tol=options.tol or 0.0, max_iters=options.max_iters,
                      jacobian=pc.decision.jacobian, window=options.window, sampler_jacobian=options.sampler_jacobian,
                      kernels=options.kernels, save_trajectory=_needs_grad(pc.match),
                      const_prefix=f"_pcr_chain{i}_const", adaptive=options.mode == "auto",
                      stack_groups=ops.STACK_GROUPS_OP, replaced=replaced)
        names.append(f"{ops.NAMESPACE}::{spec.name}")
        log.info("deeppcr: chain of %d steps (%d nodes each) -> %s [%s]", pc.match.length,
                 pc.match.nodes_per_step, spec.name, pc.decision.jacobian)
    _trace_plan(plan, names)
    if not chosen:
        if new is not gm and len(scan_nodes(new.graph)) < len(scan_nodes(gm.graph)):
            # Unrolled scans stay unrolled: Inductor (torch 2.13, CPU) fails on some scan graphs it is handed.
            return cleanup(new), plan, names
        return gm, plan, names  # unchanged: not even the out-of-place rewrites
    return cleanup(new), plan, names


def solves_only(gm: GraphModule) -> bool:
    """Whether every computation in `gm` is a deeppcr op (chain ops, their stacks), an index of their
    outputs or a `detach` of an input they take without gradient: then there is nothing for Inductor to
    compile."""
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op != "call_function":
            return False
        if n.target not in (operator.getitem, torch.Tensor.detach) and \
                getattr(n.target, "namespace", None) != ops.NAMESPACE:
            return False
    return True


def capturing_backend(options: Options, sink: list[dict]):
    """A backend that rewrites like deeppcr and records, per graph, the rewritten Dynamo graph, the plan, the
    chain ops and the AOTAutograd forward and backward graphs (run uncompiled); for inspection and tests."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    def backend(gm, example_inputs):
        new, plan, names = rewrite(gm, options)
        entry = {"graph": len(sink), "dynamo": new, "plan": plan, "names": names, "forward": None, "backward": None}
        sink.append(entry)

        def fw(g, _):
            entry["forward"] = g
            return make_boxed_func(g.forward)

        def bw(g, _):
            entry["backward"] = g
            return make_boxed_func(g.forward)

        return aot_module_simplified(new, example_inputs, fw_compiler=fw, bw_compiler=bw)

    return backend


# Dynamo's signals to trace the frame again (say, with a float specialised: TensorifyScalarRestartAnalysis
# from AOTAutograd): control flow, not failures, so they pass through the fallbacks below untouched.
RESTARTS = (torch._dynamo.exc.RestartAnalysis,)


def deeppcr(gm: GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The backend function (registered as "deeppcr" through the torch_dynamo_backends entry point).

    `mode` is torch.compile's: an Inductor mode for the rest of the graph (torch.compile passes `mode` or
    `options`, never both; `options={"inductor_mode": ...}` combines one with deeppcr's own options).
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    if mode is not None:
        if mode in MODES:
            raise ValueError(f"torch.compile(mode={mode!r}) sets Inductor's mode; deeppcr's own mode is an option: "
                             f"torch.compile(model, backend='deeppcr', options={{'mode': {mode!r}}})")
        if mode not in inductor_modes():
            raise ValueError(f"torch.compile mode must be one of Inductor's modes {inductor_modes()} with backend "
                             f"'deeppcr', got {mode!r}")
        options = {"inductor_mode": mode}
    opts = Options.parse(options)
    if opts.process_group is not None:  # an unknown name is an error now, whether or not a chain is rewritten
        from .distributed.chain_op import resolve

        resolve(opts.process_group)
    from .distributed.ddp import compile_under_ddp  # DDP: split the graph keeping chains whole (issue 17)

    routed = compile_under_ddp(gm, example_inputs, opts, lambda g, inputs: deeppcr(g, inputs, options=opts))
    if routed is not None:
        return routed
    patches = list_mode_options(opts.inductor_mode) if opts.inductor_mode else None
    try:
        new, plan, names = rewrite(gm, opts)
    except Exception as e:
        if opts.strict or isinstance(e, RESTARTS):
            raise
        log.warning("deeppcr: internal error while rewriting chains; compiling the original graph with Inductor",
                    exc_info=True)
        return compile_fx(gm, example_inputs, config_patches=patches)
    if names and opts.inductor_mode is None and solves_only(new):
        # Nothing but chain ops (and their stacks): Inductor would add only its wrapper (a size/stride check
        # per input on every call) and AOTAutograd a trace of ops whose autograd is already theirs.
        log.info("deeppcr: the graph is its chain ops alone; run as it is, without AOTAutograd and Inductor")
        if not torch.is_grad_enabled():  # Dynamo guards grad mode: this graph never runs with autograd on
            for n in new.graph.nodes:
                impl = ops.no_grad_impl(n.target) if n.op == "call_function" else None
                if impl is not None:
                    n.target = impl
            new.recompile()
        compiled = new.forward
    else:
        try:
            compiled = compile_fx(new, example_inputs, config_patches=patches)
        except Exception as e:
            if opts.strict or not names or isinstance(e, RESTARTS):
                raise
            # AOTAutograd traces the chain ops' forward and backward here: a defect there must not cost the compile.
            log.warning("deeppcr: compiling the rewritten graph failed; compiling the original graph with Inductor",
                        exc_info=True)
            return compile_fx(gm, example_inputs, config_patches=patches)
    if opts.process_group is not None and names:  # issue 17: chains solved across the group's ranks
        from .distributed.chain_op import wrap_compiled

        return wrap_compiled(compiled, opts.process_group)
    return compiled
