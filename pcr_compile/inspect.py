"""The library behind `pcr-compile inspect`: what the deeppcr backend finds in a model, does to it, and computes.

Stages, each a plain function over plain data (the CLI in ``pcr_compile.cli`` only parses arguments and prints):

1. :func:`load_target` / :func:`builtin_target`: the model and its example inputs (positional, and keyword).
2. :func:`analyse`: ``torch._dynamo.explain`` (graphs, graph breaks with reasons, ops per graph), then the chain
   finder and cost model on every graph (``pcr_compile.api.report_graph``), then ``backend.rewrite`` on a copy of
   every graph: the FX graph before and after the rewrite.
3. :func:`capture_aot`: the AOTAutograd forward and backward graphs of the rewritten graphs (one forward and one
   backward call through a capturing backend), with the chain ops' lines marked ``>>``.
4. :func:`run_compiled`: ``torch.compile(model, backend="deeppcr", options=...)`` run once (forward, and backward
   on request) under ``record_solves``; compared with eager.
5. :func:`to_dict` (the ``--json`` document), :func:`render` (the human text), :func:`dump` (``--dump-dir``),
   :func:`plot_residuals` (``--plot``).

The human text is stable plain text (no timings, no addresses), so two runs can be diffed; the JSON document is
for machines: it carries ``schema_version`` (within one version keys are only added, never removed or
changed). The JSON schema:

{
  "schema_version": 1,
  "tool": "pcr-compile inspect",
  "torch_version": str,
  "target": {"spec": str, "description": str, "inputs": [{"shape": [int], "dtype": str}],
             "kwargs": {name: {"shape": [int], "dtype": str} | {"value": str}}},   # keyword inputs
  "options": {...},              # every backend option, after Options.parse (defaults filled in)
  "report": {...},               # pcr_compile.explain's Report.to_dict() (its own schema_version):
                                 #   graph_count, graph_break_count, graph_breaks [str], graphs [{index, nodes,
                                 #   ops {op: count}}], chains [{graph, first, last, length, nodes_per_step, kind,
                                 #   state_shape, state_shapes, per_step_inputs, lifted_constants,
                                 #   invariant_inputs, jacobian, decision, reason, exposed_values}],
                                 #   declined [{graph, first, last, length, nodes_per_step, reason}], options
  "graph_break_locations": [str],   # "file:line in function" per graph break (same order as graph_breaks)
  "rewrite": [{"graph": int, "rewritten": bool, "chain_ops": [str], "error": str | null,
               "before": str | null, "after": str | null}],   # before/after: print_readable(), with --graphs
  "note": str | null,            # why nothing was rewritten, when nothing was
  "aot": null | [{"graph": int, "forward": str, "backward": str | null,
                  "chain_ops": {"forward": [str], "backward": [str]}}],   # with --aot; ops as the graphs print
                                 #   them: pcr_compile.chain_<hash>.default, pcr_compile.chain_<hash>_adjoint.default
  "run": null | {"backward": bool, "loss": str, "outputs": [{"shape": [int], "dtype": str}],
                 "max_abs_error": float, "max_rel_error": float,       # compiled output against eager
                 "grad_max_rel_error": float | null,                   # with --backward
                 "solves": [{"chain", "length", "iterations", "residual", "converged", "fell_back",
                             "direction", "jacobian", "prefix", "residuals": [float], "reason", "seconds",
                             "evaluations", "sequential_steps"}]}
}
  residuals[k] is the solve's relative residual after k iterations (residuals[0]: the initial guess), so
  residuals has iterations + 1 entries and residuals[-1] == residual. Non-finite numbers are written as
  the strings "inf", "-inf" and "nan" (the document is strict JSON).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

from .api import Report, report_graph
from .options import Options

SCHEMA_VERSION = 1
JSON_SCHEMA = (__doc__ or "").partition("The JSON schema:\n\n")[2]  # shown by `pcr-compile inspect --help`
CHAIN_MARK = ">> "
CHAIN_OP_TEXT = "torch.ops.pcr_compile.chain_"
LOSS = "sum over tensor outputs of mean(y.float() ** 2)"
# built-in example -> (its size flags, their defaults)
BUILTINS = {
    "mlp": {"layers": 16, "width": 8, "batch": 4},
    "resmlp": {"layers": 16, "width": 16, "batch": 4},
    "resnet": {"layers": 8, "width": 8, "batch": 2},
    "ddim": {"steps": 10, "width": 32, "batch": 4},
}


class TargetError(ValueError):
    """TARGET could not be loaded, or its callable did not return `(model, example_inputs)` or
    `(model, example_inputs, example_kwargs)`."""


class OptionsError(ValueError):
    """--options is not a JSON object of valid backend options."""


@dataclass
class Target:
    spec: str
    description: str
    model: object
    inputs: tuple
    kwargs: dict = field(default_factory=dict)  # keyword inputs: model(*inputs, **kwargs)


@dataclass
class GraphRewrite:
    graph: int
    rewritten: bool
    chain_ops: list[str]
    error: str | None
    before: str
    after: str | None


@dataclass
class Inspection:
    target: Target
    options: Options
    report: Report
    break_locations: list[str]
    rewrites: list[GraphRewrite]
    aot: list[dict] | None = None
    run: dict | None = None
    sections: set = field(default_factory=set)  # {"graphs"}: show the before/after texts


# --- 1. targets -------------------------------------------------------------------------------------------------


def builtin_target(name: str, seed: int = 0, **sizes) -> Target:
    """A built-in example: `mlp`, `resmlp`, `resnet` or `ddim`; `sizes` are its flags (None: the default)."""
    from . import models

    if name not in BUILTINS:
        raise TargetError(f"unknown built-in example {name!r}; choose from {sorted(BUILTINS)}")
    allowed = BUILTINS[name]
    extra = sorted(k for k, v in sizes.items() if v is not None and k not in allowed)
    if extra:
        raise TargetError(f"{', '.join('--' + k for k in extra)} does not apply to {name!r} "
                          f"(it takes {', '.join('--' + k for k in allowed)})")
    s = {k: (sizes.get(k) if sizes.get(k) is not None else d) for k, d in allowed.items()}
    bad = sorted(k for k, v in s.items() if v < 1)
    if bad:
        raise TargetError(f"{', '.join('--' + k for k in bad)} must be >= 1")
    torch.manual_seed(seed)
    if name == "mlp":
        model = models.DeepMLP(layers=s["layers"], width=s["width"], activation="tanh", gain=0.9)
        desc = f"DeepMLP: {s['layers']} x (Linear({s['width']}, {s['width']}) + tanh)"
        x = torch.randn(s["batch"], s["width"])
    elif name == "resmlp":
        model = models.ResidualMLP(blocks=s["layers"], width=s["width"])
        desc = f"ResidualMLP: {s['layers']} pre-norm residual blocks of width {s['width']}"
        x = torch.randn(s["batch"], s["width"])
    elif name == "resnet":
        model = models.ConvResNet(blocks=s["layers"], channels=s["width"])
        desc = f"ConvResNet: {s['layers']} residual conv blocks, {s['width']} channels, 8x8 images"
        x = torch.randn(s["batch"], 3, 8, 8)
    else:
        model = models.DDIMSampler(models.MLPDenoiser(dim=2, hidden=s["width"]), steps=s["steps"])
        desc = f"DDIMSampler: {s['steps']} DDIM steps of an MLPDenoiser (hidden {s['width']}) on 2-d points"
        x = torch.randn(s["batch"], 2)
    return Target(name, desc, model, (x,))


def _import_file(path: str):
    p = Path(path)
    if not p.is_file():
        raise TargetError(f"{path}: no such file")
    name = f"_pcr_compile_target_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise TargetError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(p.resolve().parent))  # like `python file.py`: the file's siblings are importable
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise TargetError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_target(spec: str) -> Target:
    """`package.module:callable` or `path/to/file.py:callable`; the callable returns `(model, example_inputs)` or
    `(model, example_inputs, example_kwargs)`, example_kwargs a dict of keyword inputs (`attention_mask=...`,
    `use_cache=False`)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise TargetError(f"{spec!r} is neither a built-in example ({', '.join(sorted(BUILTINS))}) nor "
                          "'package.module:callable' or 'path/to/file.py:callable'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _import_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise TargetError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise TargetError(f"{where} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TargetError(f"{spec}: {attr} is not callable")
    try:
        result = fn()
    except Exception as e:
        raise TargetError(f"{spec}() raised {type(e).__name__}: {e}") from e
    expected = ("expected (model, example_inputs) or (model, example_inputs, example_kwargs) with example_inputs "
                "a tuple of tensors and example_kwargs a dict")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise TargetError(f"{spec}() returned {_describe(result)}; {expected}")
    model, inputs, kwargs = (*result, {}) if len(result) == 2 else result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not callable(model):
        raise TargetError(f"{spec}() returned a model that is not callable ({_describe(model)}); {expected}")
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TargetError(f"{spec}() returned example_inputs {_describe(inputs)}; {expected}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TargetError(f"{spec}() returned example_kwargs {_describe(kwargs)}; {expected}")
    return Target(spec, type(model).__name__, model, tuple(inputs), dict(kwargs))


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj[:4])})"
    return f"a {type(obj).__name__}"


def parse_options(text: str | None) -> Options:
    """--options JSON -> Options; OptionsError (one line) on malformed JSON or a value Options.parse rejects."""
    if text is None:
        return Options()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionsError(f"options: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise OptionsError(f"options: expected a JSON object such as '{{\"mode\": \"parallel\"}}', got {text!r}")
    try:
        return Options.parse(value)
    except (ValueError, TypeError) as e:
        raise OptionsError(f"options: {e}") from e


# --- 2. analysis and rewrite ------------------------------------------------------------------------------------


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False).rstrip() + "\n"


def mark_chain_ops(text: str) -> str:
    """Prefix the lines that call a chain op (forward or adjoint) with `>> `, every other line with 3 spaces."""
    return "".join((CHAIN_MARK if CHAIN_OP_TEXT in line else "   ") + line for line in text.splitlines(True))


def chain_ops_in(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("pcr_compile.chain_")]


def analyse(target: Target, options: Options) -> Inspection:
    """Dynamo's view of the model, the chains in every graph and the rewrite the options give; compiles nothing."""
    from .backend import rewrite

    torch._dynamo.reset()
    out = torch._dynamo.explain(target.model)(*target.inputs, **target.kwargs)
    report = Report(options=options.as_dict())
    report.graph_breaks = [str(r.reason) for r in out.break_reasons]
    locations = []
    for r in out.break_reasons:
        f = r.user_stack[-1] if r.user_stack else None
        locations.append(f"{f.filename}:{f.lineno} in {f.name}" if f is not None else "")
    rewrites = []
    for i, gm in enumerate(out.graphs):
        report_graph(report, i, gm, options)
        try:
            new, _, names = rewrite(gm, options)
            rewrites.append(GraphRewrite(i, bool(names), names, None, _readable(gm), _readable(new)))
        except Exception as e:  # the backend would log this and compile the original graph with Inductor
            rewrites.append(GraphRewrite(i, False, [], f"{type(e).__name__}: {e}", _readable(gm), None))
    torch._dynamo.reset()
    return Inspection(target, options, report, locations, rewrites)


def nothing_rewritten_note(ins: Inspection) -> str | None:
    """Why no graph was rewritten, or None when one was."""
    if any(r.rewritten for r in ins.rewrites):
        return None
    errors = [r for r in ins.rewrites if r.error]
    if errors:
        return (f"nothing rewritten: the rewrite of graph {errors[0].graph} failed ({errors[0].error}); the backend "
                "compiles the original graph with Inductor")
    tail = "the graph after the rewrite is the graph before; Inductor compiles it as torch.compile(model) would"
    if not ins.report.chains:
        return f"nothing rewritten: no chains found; {tail}"
    mode = ins.options.mode
    if mode == "sequential":
        return f"nothing rewritten: mode='sequential' finds chains and rewrites none; {tail}"
    devices = {str(t.device.type) for t in (*ins.target.inputs, *ins.target.kwargs.values())
               if isinstance(t, torch.Tensor)}
    if mode == "auto" and "cuda" not in devices:
        return (f"nothing rewritten: mode='auto' keeps chains sequential on {'/'.join(sorted(devices)) or 'cpu'} "
                "(the parallel solve is a GPU effect); pass --options '{\"mode\": \"parallel\"}' to force it; "
                + tail)
    return f"nothing rewritten: no chain was decided 'parallel' (see the reasons above); {tail}"


# --- 3. AOTAutograd graphs --------------------------------------------------------------------------------------


def _tensor_leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _loss(out) -> torch.Tensor | None:
    ts = [t for t in _tensor_leaves(out) if t.requires_grad]
    return sum(t.float().pow(2).mean() for t in ts) if ts else None


def capture_aot(target: Target, options: Options) -> list[dict]:
    """The AOTAutograd forward/backward graphs of every rewritten graph (one forward, and a backward when the
    output requires grad, through a backend that rewrites like deeppcr and runs the graphs uncompiled)."""
    from .backend import capturing_backend

    graphs: list[dict] = []
    backend = capturing_backend(options, graphs)

    torch._dynamo.reset()
    loss = _loss(torch.compile(target.model, backend=backend)(*target.inputs, **target.kwargs))
    if loss is not None:
        loss.backward()
    torch._dynamo.reset()
    result = []
    for e in graphs:
        fw, bw = e["forward"], e["backward"]
        result.append({"graph": e["graph"], "forward": _readable(fw) if fw is not None else None,
                       "backward": _readable(bw) if bw is not None else None,
                       "chain_ops": {"forward": chain_ops_in(fw) if fw is not None else [],
                                     "backward": chain_ops_in(bw) if bw is not None else []}})
    return result


# --- 4. run -----------------------------------------------------------------------------------------------------


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    abs_err = max((float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b)
                   if x.numel()), default=0.0)
    scale = max((float(y.detach().double().abs().max()) for y in b if y.numel()), default=0.0)
    return abs_err, abs_err / scale if scale > 0 else abs_err


def run_compiled(target: Target, options: Options, backward: bool = False) -> dict:
    """Run `torch.compile(model, backend="deeppcr", options=...)` once (and its backward), record every solve."""
    from .records import record_solves

    model, inputs, kwargs = target.model, target.inputs, target.kwargs
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    y_ref = model(*inputs, **kwargs)
    ref = [t.detach() for t in _tensor_leaves(y_ref)]
    loss_ref = _loss(y_ref) if backward and params else None
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True) if loss_ref is not None else None

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deeppcr", options=options.as_dict())
    with record_solves() as solves:
        y = compiled(*inputs, **kwargs)
        outs = _tensor_leaves(y)
        grad_err = None
        if g_ref is not None:
            loss = _loss(y)
            g = torch.autograd.grad(loss, params, allow_unused=True) if loss is not None else None
            if g is not None:
                pairs = [(a, b) for a, b in zip(g, g_ref) if a is not None and b is not None]
                grad_err = _max_err([a for a, _ in pairs], [b for _, b in pairs])[1]
    torch._dynamo.reset()
    abs_err, rel_err = _max_err(outs, ref)
    return {"backward": g_ref is not None, "loss": LOSS,
            "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in outs],
            "max_abs_error": abs_err, "max_rel_error": rel_err, "grad_max_rel_error": grad_err,
            "solves": [{**asdict(s), "residuals": list(s.residuals)} for s in solves]}


def plot_residuals(run: dict, path: str) -> None:
    """Residual per iteration of every solve, log scale (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(run["solves"]):
        ys = [r if r > 0 else float("nan") for r in s["residuals"]]
        ax.semilogy(range(len(ys)), ys, marker="o", label=f"{i}: {s['direction']} {_short(s['chain'])} "
                                                           f"({s['length']} steps, {s['jacobian']})")
    if not run["solves"]:
        ax.text(0.5, 0.5, "no chain solves ran (nothing was rewritten)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("iteration (0: initial guess)")
    ax.set_ylabel("max relative residual")
    ax.set_title("pcr-compile: residual per iteration of each chain solve")
    ax.grid(True, which="both", alpha=0.3)
    if run["solves"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- 5. output --------------------------------------------------------------------------------------------------


def _short(chain: str) -> str:
    return chain.removeprefix("pcr_compile::")


def _finite(obj):
    """Non-finite floats as strings, so that the document is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_dict(ins: Inspection, graphs: bool | None = None) -> dict:
    """The `--json` document (schema in this module's docstring); the graph texts when `graphs` (default: when
    they were asked for)."""
    show = "graphs" in ins.sections if graphs is None else graphs
    return _finite({
        "schema_version": SCHEMA_VERSION,
        "tool": "pcr-compile inspect",
        "torch_version": torch.__version__,
        "target": {"spec": ins.target.spec, "description": ins.target.description,
                   "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                              for t in ins.target.inputs],
                   "kwargs": {k: ({"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                  if isinstance(v, torch.Tensor) else {"value": repr(v)})
                              for k, v in ins.target.kwargs.items()}},
        "options": ins.options.as_dict(),
        "report": ins.report.to_dict(),
        "graph_break_locations": list(ins.break_locations),
        "rewrite": [{"graph": r.graph, "rewritten": r.rewritten, "chain_ops": r.chain_ops, "error": r.error,
                     "before": r.before if show else None, "after": r.after if show else None}
                    for r in ins.rewrites],
        "note": nothing_rewritten_note(ins),
        "aot": ins.aot,
        "run": ins.run,
    })


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]"


def _inputs_text(target: Target) -> str:
    """`float32[4, 8], attention_mask=int64[4, 8], use_cache=False`: positional, then keyword inputs."""
    kw = [f"{k}={_shape(v) if isinstance(v, torch.Tensor) else repr(v)}" for k, v in target.kwargs.items()]
    return ", ".join([*(_shape(t) for t in target.inputs), *kw])


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, width=110, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def render_summary(ins: Inspection) -> str:
    """Header, the explain-style summary, and per graph the chains and the declined candidates."""
    r, o = ins.report, ins.options
    opts = " ".join(f"{k}={v!r}" for k, v in o.as_dict().items())
    par = sum(c.decision == "parallel" for c in r.chains)
    lines = [f"Target: {ins.target.spec}: {ins.target.description}",
             f"Inputs: {_inputs_text(ins.target)}",
             *_wrap(f"Options: {opts}"), "",
             f"Graph Count: {len(r.graphs)}",
             f"Graph Break Count: {len(r.graph_breaks)}",
             f"Op Count: {sum(sum(g.ops.values()) for g in r.graphs)}",
             f"Chain Count: {len(r.chains)} ({par} parallel, {len(r.chains) - par} sequential)",
             f"Declined Count: {len(r.declined)}"]
    if r.graph_breaks:
        lines.append("Break Reasons:")
        for i, (reason, where) in enumerate(zip(r.graph_breaks, ins.break_locations), 1):
            text = [ln for ln in reason.splitlines() if ln.strip()]
            lines.append(f"  Break Reason {i}: {text[0] if text else ''}")
            if where:
                lines.append(f"    at {where}")
            lines += [f"    {ln.strip()}" for ln in text[1:]]
    lines.append("Ops per Graph:")
    for g in r.graphs:
        ops = ", ".join(f"{k}\0x{v}" for k, v in g.ops.items())  # \0: a space the wrap keeps
        lines += [ln.replace("\0", " ") for ln in _wrap(f"  Graph {g.index}: {g.nodes} nodes; {ops or 'no ops'}",
                                                          indent="    ")]
    note = nothing_rewritten_note(ins)
    if note:
        lines += ["", *_wrap(f"Note: {note}")]
    for g in r.graphs:
        lines += ["", f"Graph {g.index}: chains", r.chain_table(graph=g.index),
                  "", f"Graph {g.index}: declined candidates", r.declined_table(graph=g.index)]
    return "\n".join(lines) + "\n"


def render_graphs(ins: Inspection) -> str:
    lines = []
    for rw in ins.rewrites:
        lines += [f"=== Graph {rw.graph}: FX graph before the rewrite ===", mark_chain_ops(rw.before).rstrip(), ""]
        if rw.error:
            lines += [f"=== Graph {rw.graph}: rewrite failed: {rw.error} (the backend compiles the graph above) ===",
                      ""]
            continue
        head = (f"chain ops (marked {CHAIN_MARK.strip()}): {', '.join(rw.chain_ops)}" if rw.rewritten
                else "unchanged: nothing rewritten")
        lines += [f"=== Graph {rw.graph}: FX graph after the rewrite; {head} ===", mark_chain_ops(rw.after).rstrip(),
                  ""]
    return "\n".join(lines)


def render_aot(aot: list[dict], which: str | None = None) -> str:
    lines = []
    for e in aot:
        for kind in ([which] if which else ["forward", "backward"]):
            text = e[kind]
            ops = e["chain_ops"][kind]
            head = f"chain ops (marked {CHAIN_MARK.strip()}): {', '.join(ops)}" if ops else "no chain ops"
            if text is None:
                lines += [f"=== Graph {e['graph']}: AOTAutograd {kind} graph: none (the output does not require "
                          "grad) ===", ""]
            else:
                lines += [f"=== Graph {e['graph']}: AOTAutograd {kind} graph; {head} ===",
                          mark_chain_ops(text).rstrip(), ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def render_run(run: dict) -> str:
    what = "forward and backward" if run["backward"] else "forward"
    lines = [f"=== Run: torch.compile(model, backend=\"deeppcr\", options=...), {what} ===",
             *([f"loss for the backward pass: {LOSS}"] if run["backward"] else []),
             f"outputs: {', '.join(o['dtype'] + str(o['shape']) for o in run['outputs'])}; against eager: "
             f"max abs error {_fmt(run['max_abs_error'])}, max rel error {_fmt(run['max_rel_error'])}"
             + (f"; gradients: max rel error {_fmt(run['grad_max_rel_error'])}" if run["backward"] else "")]
    solves = run["solves"]
    if not solves:
        lines.append("no chain solves ran (nothing was rewritten)")
        return "\n".join(lines) + "\n"
    rows = [[i, s["direction"], _short(s["chain"]), s["length"], s["jacobian"], s["iterations"],
             _fmt(s["residual"]), "yes" if s["converged"] else "no",
             ("yes: " + (s["reason"] or "?") + f" (prefix {s['prefix']})") if s["fell_back"] else "no"]
            for i, s in enumerate(solves)]
    lines += [f"solves: {len(solves)}",
              tabulate(rows, headers=["solve", "direction", "chain", "steps", "jacobian", "iterations",
                                      "residual", "converged", "fell back"], disable_numparse=True,
                       colalign=("right", "left", "left", "right", "left", "right", "right", "left", "left")),
              "", "residual after each iteration (relative; iteration 0 is the initial guess):"]
    for i, s in enumerate(solves):
        rs = "  ".join(f"{k}: {_fmt(v)}" for k, v in enumerate(s["residuals"]))
        lines.append(f"  solve {i} ({s['direction']}): {rs}")
    return "\n".join(lines) + "\n"


def render(ins: Inspection) -> str:
    """The human report: the summary, then the sections that were asked for."""
    parts = [render_summary(ins)]
    if "graphs" in ins.sections:
        parts.append(render_graphs(ins))
    if ins.aot is not None:
        parts.append(render_aot(ins.aot))
    if ins.run is not None:
        parts.append(render_run(ins.run))
    return "\n".join(parts)


def dump(ins: Inspection, directory: str) -> list[str]:
    """Write every stage computed to `directory`; returns the file names written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {"summary.txt": render_summary(ins),
             "chains.json": json.dumps(_finite(ins.report.to_dict()), indent=2) + "\n",
             "inspect.json": json.dumps(to_dict(ins, graphs=True), indent=2) + "\n"}
    for rw in ins.rewrites:
        files[f"graph_{rw.graph}_before.txt"] = mark_chain_ops(rw.before)  # same indent as after: diffable
        if rw.after is not None:
            files[f"graph_{rw.graph}_after.txt"] = mark_chain_ops(rw.after)
    if ins.aot is not None:
        files["aot_forward.txt"] = render_aot(ins.aot, "forward")
        files["aot_backward.txt"] = render_aot(ins.aot, "backward")
    if ins.run is not None:
        files["solves.json"] = json.dumps(_finite(ins.run), indent=2) + "\n"
        files["solves.txt"] = render_run(ins.run)
    for name, text in files.items():
        (d / name).write_text(text)
    return sorted(files)
