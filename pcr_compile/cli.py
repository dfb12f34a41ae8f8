"""`pcr-compile`: the command line of pcr_compile (installed as a console script; also `python -m pcr_compile.cli`).

    pcr-compile inspect TARGET [--layers N] [--width N] [--batch N] [--steps N] [--seed N]
                               [--options JSON] [--graphs] [--aot] [--run [--backward]] [--plot FILE.png]
                               [--json] [--dump-dir DIR] [--verbose]

`inspect` shows what the deeppcr backend finds in a model and what it does with it, shaped like
`torch._dynamo.explain`'s report and tlparse's artifacts: a human report by default, `--json` for machines,
`--dump-dir` for one file per stage. The work is done by ``pcr_compile.inspection``; this module parses
arguments, prints, and maps errors to exit statuses:

    0  success
    1  the model failed to trace, compile or run (one line on stderr; the traceback with --verbose)
    2  usage: bad arguments, an unloadable TARGET, a callable that does not return (model, example_inputs)
       or (model, example_inputs, example_kwargs), bad --options (malformed JSON or a value Options.parse
       rejects), or no command given (prints the help)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

PROG = "pcr-compile"

EXIT_STATUS = """\
exit status:
  0  success
  1  the model failed to trace, compile or run (one line on stderr; the traceback with --verbose)
  2  usage error: bad arguments, an unloadable TARGET, a callable that does not return
     (model, example_inputs) or (model, example_inputs, example_kwargs), bad --options; also when no
     command is given (the help goes to stderr)"""

INSPECT_EPILOG = """\
TARGET is one of
{builtins}
  package.module:callable  or  path/to/file.py:callable
           the callable takes no arguments and returns (model, example_inputs), example_inputs a tuple of
           tensors, or (model, example_inputs, example_kwargs), example_kwargs a dict of keyword inputs
           (attention_mask=..., use_cache=False); the size flags apply to the built-in examples only.

What is shown:
  always       the summary (graphs, graph breaks with reasons, ops per graph) and, per graph, the chains
               (first/last node, steps, nodes per step, kind, state, per-step inputs, Jacobian, decision,
               reason) and the declined candidates with their reasons
  --graphs     the Dynamo FX graph before and after the rewrite the options give (chain ops marked >>);
               with mode "auto" on CPU nothing is rewritten, and the report says so
  --aot        the AOTAutograd forward and backward graphs, chain op and adjoint op lines marked >> (runs
               forward once, and backward when the output requires grad, through a capturing backend that
               does not compile)
  --run        torch.compile(model, backend="deeppcr", options=...) run once, compared with eager; per
               chain solve: iterations, final residual, fallback, residual after every iteration
  --dump-dir   writes summary.txt, chains.json (pcr_compile.explain's report), inspect.json (the --json
               document), graph_<i>_before.txt, graph_<i>_after.txt, and with --aot aot_forward.txt and
               aot_backward.txt, with --run solves.json and solves.txt

examples:
  pcr-compile inspect mlp --layers 16 --options '{"mode": "parallel"}' --run --backward
  pcr-compile inspect ddim --steps 10 --options '{"mode": "parallel"}' --run --plot residuals.png
  pcr-compile inspect my_models.py:make --graphs --json > report.json

--json prints one document (schema_version 1):
"""


def _inspect_parser(sub) -> argparse.ArgumentParser:
    from .inspection import JSON_SCHEMA
    from .inspection.targets import BUILTINS, builtins_help

    p = sub.add_parser(
        "inspect", help="show the chains the deeppcr backend finds in a model, its rewrite, and its solves",
        description="Show what the deeppcr backend finds in a model (chains, decisions, declined candidates),\n"
                    "the graphs before and after its rewrite, and the solves of one compiled run.",
        epilog=INSPECT_EPILOG.replace("{builtins}", builtins_help()) + JSON_SCHEMA + "\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help=" | ".join(BUILTINS) + " | package.module:callable | "
                                                   "path/to/file.py:callable (see below)")
    size = p.add_argument_group("built-in example sizes")
    size.add_argument("--layers", type=int, help="layers / residual blocks (mlp, resmlp, resnet)")
    size.add_argument("--width", type=int, help="width (mlp, resmlp), channels (resnet), denoiser hidden size (ddim)")
    size.add_argument("--batch", type=int, help="batch size of the example input")
    size.add_argument("--steps", type=int, help="sampler steps (ddim)")
    size.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building (default 0)")
    p.add_argument("--options", metavar="JSON", help="backend options as a JSON object, e.g. "
                                                     "'{\"mode\": \"parallel\", \"tol\": 1e-6}' (default: {})")
    p.add_argument("--graphs", action="store_true", help="show the FX graph before and after the rewrite")
    p.add_argument("--aot", action="store_true", help="show the AOTAutograd forward and backward graphs")
    p.add_argument("--run", action="store_true", help="run the compiled model once and show every chain solve")
    p.add_argument("--backward", action="store_true", help="with --run: also run the backward pass")
    p.add_argument("--plot", metavar="FILE.png", help="draw the residual per iteration of every solve (implies --run)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    p.add_argument("--dump-dir", metavar="DIR", help="write every stage computed to a file in DIR")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks on errors; pcr_compile's INFO log")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="pcr_compile: a torch.compile backend (backend=\"deeppcr\") that solves chains of "
                               "repeated computation in parallel.",
        epilog="Run `pcr-compile inspect --help` for the inspection options.\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _inspect_parser(sub)
    return parser


class _Fail(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _inspect(args) -> int:
    from . import inspection as ins_mod

    try:
        options = ins_mod.parse_options(args.options)
        sizes = dict(layers=args.layers, width=args.width, batch=args.batch, steps=args.steps)
        if args.target in ins_mod.BUILTINS:
            target = ins_mod.builtin_target(args.target, seed=args.seed, **sizes)
        else:
            given = [f"--{k}" for k, v in sizes.items() if v is not None]
            if given:
                raise ins_mod.TargetError(f"{', '.join(given)} apply to the built-in examples only, "
                                          f"not to {args.target!r}")
            import torch

            torch.manual_seed(args.seed)
            target = ins_mod.load_target(args.target)
    except (ins_mod.TargetError, ins_mod.OptionsError) as e:
        raise _Fail(2, str(e)) from e
    if args.backward and not (args.run or args.plot):
        raise _Fail(2, "--backward needs --run")
    run = args.run or bool(args.plot)

    stage = "tracing the model (torch._dynamo.explain)"
    try:
        ins = ins_mod.analyse(target, options)
        if args.graphs:
            ins.sections.add("graphs")
        if args.aot:
            stage = "capturing the AOTAutograd graphs"
            ins.aot = ins_mod.capture_aot(target, options)
        if run:
            stage = "running the compiled model"
            ins.run = ins_mod.run_compiled(target, options, backward=args.backward)
        if args.plot:
            stage = f"plotting to {args.plot}"
            ins_mod.plot_residuals(ins.run, args.plot)
        if args.dump_dir:
            stage = f"writing to {args.dump_dir}"
            ins_mod.dump(ins, args.dump_dir)
    except Exception as e:
        raise _Fail(1, f"{stage} failed: {type(e).__name__}: {_first_line(e)}") from e

    if args.json:
        print(json.dumps(ins_mod.to_dict(ins), indent=2))
    else:
        print(ins_mod.render(ins), end="")
        if args.plot:
            print(f"residual plot written to {args.plot}")
        if args.dump_dir:
            print(f"stages written to {args.dump_dir}")
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pcr-compile` console script; returns (and, as a script, exits with) the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("pcr_compile").setLevel(logging.INFO)
    try:
        return _inspect(args)
    except _Fail as e:
        if args.verbose:
            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
