"""Command line: `python -m benchmarks {run,plot,table,list} ...` (see `python -m benchmarks run -h`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import harness, measuring, output, plots, suites, tables
from . import providers as provs

SUITE_CHOICES = ("mlp", "resnet", "diffusion", "all", "smoke")


def _parse_option(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    low = v.lower()
    if low in ("true", "false"):
        return k, low == "true"
    if low == "none":
        return k, None
    for cast in (int, float):
        try:
            return k, cast(v)
        except ValueError:
            pass
    return k, v


def _filter(cases, pattern):
    import re

    if not pattern:
        return cases
    rx = re.compile(pattern)
    return [c for c in cases if rx.search(f"{c.model} {c.parameters}")]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_run(a: argparse.Namespace) -> int:
    import torch

    device = a.device or _default_device()
    threads = torch.get_num_threads()
    # CPU runs default to one intra-op thread: on a busy 2-core machine OpenMP's spin-waiting slows
    # multi-threaded calls by 10-100x, at random (a 10-step sampler: 0.5 ms with 1 thread, 300 ms with 2).
    want = a.threads or (1 if device == "cpu" else None)
    if want:
        torch.set_num_threads(want)
    try:
        return _run(a, device)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace, device: str) -> int:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    cases = _filter(suites.cases_for(a.suite, a.quick), a.filter)
    providers = provs.select_providers(provs.default_providers(dict(a.pcr_option or [])), a.providers)
    reps = {"min_reps": a.reps, "max_reps": a.reps, "budget_s": 0.0} if a.reps else {"budget_s": a.budget}
    cfg = measuring.Config.for_grid(
        a.quick, device=device, train=not a.no_train, progress=not a.no_progress, memory=not a.no_memory,
        count=not a.no_count, warm_up=not a.no_warm_up, timeout_s=a.timeout, **reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    env = output.environment(torch.device(device))
    grid = "quick" if a.quick else "full"
    print(f"{len(cases)} case(s) x {len(providers)} provider(s), suite {a.suite} ({grid} grid), "
          f"{output.header(env)}", flush=True)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    rows = harness.run_benchmarks(cases, providers, cfg, csv_path, env)
    wall = time.perf_counter() - t0
    text = tables.tables(rows)
    summary = tables.problems(rows)
    print(text)
    print()
    print(summary)
    extra = f"suite {a.suite}, {grid} grid, {len(cases)} cases, wall time {wall:.0f} s"
    if hasattr(os, "getloadavg"):
        extra += f", load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    md = (f"# Benchmark run\n\n{output.header(env, extra)}\n\n"
          f"Command: `python -m benchmarks {' '.join(a.argv)}`\n\n{text}\n\n```\n{summary}\n```\n")
    (out / "tables.md").write_text(md)
    if not a.no_plots:
        written = plots.plot_csv(csv_path, out / "plots")
        print(f"\n{len(written)} plot(s) in {out / 'plots'}")
    print(f"rows appended to {csv_path}; tables in {out / 'tables.md'}; wall time {wall:.0f} s")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    written = plots.plot_csv(a.csv, a.out or Path(a.csv).parent / "plots")
    for p in written:
        print(p)
    return 0


def cmd_table(a: argparse.Namespace) -> int:
    rows = tables.latest_run(output.read_csv(a.csv))
    env = output.env_of(rows)
    if env:
        print(output.header(env))
        print()
    print(tables.tables(rows))
    print()
    print(tables.problems(rows))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    for c in _filter(suites.cases_for(a.suite, a.quick), a.filter):
        print(f"{c.model}\t{c.parameters}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="measure a suite; append rows to OUT/results.csv, print tables, draw plots")
    r.add_argument("--suite", choices=SUITE_CHOICES, default="all")
    r.add_argument("--quick", action="store_true", help="the small grid (about 10 minutes on 2 CPU cores)")
    r.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    r.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    r.add_argument("--providers", default=None,
                   help="comma-separated labels: eager,inductor,inductor-reduce-overhead,deeppcr-parallel,deeppcr-auto")
    r.add_argument("--filter", default=None, help="regex on 'model parameters', e.g. 'layers=64,'")
    r.add_argument("--no-train", action="store_true", help="forward only")
    r.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    r.add_argument("--no-count", action="store_true",
                   help="skip counting kernel launches and host syncs (and the GPU estimate computed from "
                        "them), and deeppcr's host-overhead rows")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-warm-up", action="store_true", help="skip compiling a two-layer model first")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU default: 1)")
    r.add_argument("--reps", type=int, default=None, help="exactly N timed samples per metric")
    r.add_argument("--budget", type=float, default=None, help="seconds of timing per metric (CPU)")
    r.add_argument("--timeout", type=float, default=None, help="seconds per provider phase, compile included")
    r.add_argument("--pcr-option", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="extra deeppcr backend option, e.g. strict=true (repeatable)")
    r.set_defaults(func=cmd_run)

    p = sub.add_parser("plot", help="draw PNGs from a results CSV")
    p.add_argument("csv")
    p.add_argument("--out", default=None, help="default: plots/ next to the CSV")
    p.set_defaults(func=cmd_plot)

    t = sub.add_parser("table", help="print the tables of the latest run in a results CSV")
    t.add_argument("csv")
    t.set_defaults(func=cmd_table)

    ls = sub.add_parser("list", help="list the cases of a suite")
    ls.add_argument("--suite", choices=SUITE_CHOICES, default="all")
    ls.add_argument("--quick", action="store_true")
    ls.add_argument("--filter", default=None)
    ls.set_defaults(func=cmd_list)

    a = ap.parse_args(argv)
    a.argv = argv
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
