"""Stage 5 of `pcr-compile inspect`: the ``--json`` document (:func:`to_dict`), the human text (:func:`render`) and
the ``--dump-dir`` files (:func:`dump`). The text is stable plain text (no timings, no addresses)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import torch
from tabulate import tabulate

from ..reports import skip_summary
from .analysis import CHAIN_MARK, Inspection, mark_chain_ops, nothing_rewritten_note
from .run import LOSS, short_name
from .targets import Target

SCHEMA_VERSION = 1


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
    if r.skipped_frames:
        lines.append("Frames Run Eagerly (not compiled):")
        lines += [f"  {skip_summary(m)}" for m in r.skipped_frames]
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
    rows = [[i, s["direction"], short_name(s["chain"]), s["length"], s["jacobian"], s["iterations"],
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
