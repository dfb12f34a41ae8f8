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
                                 #   graph_count, graph_break_count, graph_breaks [str], skipped_frames [str]
                                 #   (Dynamo's messages for frames it ran eagerly), graphs [{index, nodes,
                                 #   ops {op: count}}], chains [{graph, first, last, length, nodes_per_step, kind,
                                 #   state_shape, state_shapes, per_step_inputs, lifted_constants,
                                 #   invariant_inputs, jacobian, decision, reason, exposed_values, autocast}],
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
                             "evaluations", "sequential_steps",
                             "chosen", "step_evaluations"}]}                  # sampler solves; "", 0 otherwise
}
  residuals[k] is the solve's relative residual after k iterations (residuals[0]: the initial guess), so
  residuals has iterations + 1 entries and residuals[-1] == residual. Non-finite numbers are written as
  the strings "inf", "-inf" and "nan" (the document is strict JSON).
"""

from .analysis import (
    CHAIN_MARK,
    CHAIN_OP_TEXT,
    GraphRewrite,
    Inspection,
    analyse,
    chain_ops_in,
    mark_chain_ops,
    nothing_rewritten_note,
)
from .aot import capture_aot
from .render import SCHEMA_VERSION, dump, render, render_aot, render_graphs, render_run, render_summary, to_dict
from .run import LOSS, plot_residuals, run_compiled
from .targets import BUILTINS, OptionsError, Target, TargetError, builtin_target, load_target, parse_options

JSON_SCHEMA = (__doc__ or "").partition("The JSON schema:\n\n")[2]  # shown by `pcr-compile inspect --help`

__all__ = [
    "BUILTINS", "CHAIN_MARK", "CHAIN_OP_TEXT", "GraphRewrite", "Inspection", "JSON_SCHEMA", "LOSS", "OptionsError",
    "SCHEMA_VERSION", "Target", "TargetError", "analyse", "builtin_target", "capture_aot", "chain_ops_in", "dump",
    "load_target", "mark_chain_ops", "nothing_rewritten_note", "parse_options", "plot_residuals", "render",
    "render_aot", "render_graphs", "render_run", "render_summary", "run_compiled", "to_dict",
]
