"""Host overhead per compiled call: deeppcr with the solve's device work removed, against the floor.

    python -m benchmarks.overhead [--layers 256] [--width 16] [--batch 16] [--budget 1.0] [--rounds 1] [--out DIR]

The floor is what any torch.compile backend pays per call: the model compiled with a backend that returns a
cached output (`providers.cached_output_backend`: Dynamo's guards, frame evaluation and argument handling,
nothing else). deeppcr's forward (`mode="parallel"`, under no_grad) is measured as it is and with the solve's
device work removed: `pcr_compile.solver.run_forward` patched, from here, to return the result its first call
stored (no Newton iterations, no kernels). What is left is the host cost around the solve: Inductor's
wrapper (size/stride asserts on every input), the chain op's dispatch and argument handling, its output
checks. Both are also measured with `guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`,
passed in torch.compile's `options` (torch.compile takes that key out of the options before the backend
sees them, so it combines with deeppcr's own options). Forward only: a training step has no cached-output
floor (the stored output has no autograd graph to run backward through twice). Times are wall-clock medians
per call on one intra-op thread (`timing.time_call`). Rows go to OUT/overhead.csv in the harness's schema.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .output import environment, header, make_row, write_csv
from .providers import cached_output_backend, fresh_output_backend
from .timing import Timer, time_call

GUARD_FILTER = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


@contextlib.contextmanager
def solve_work_removed() -> Iterator[dict]:
    """Patch `pcr_compile.solver.run_forward` to return, per (chain, shapes), the result of its first call."""
    from pcr_compile import solver

    real = solver.run_forward
    stored: dict[tuple, Any] = {}

    def stored_result(spec, states, per_step, consts, invariants, length, *args, **kwargs):
        key = (spec.name, length, kwargs.get("keep_trajectory", True), *[s.shape for s in states])
        if key not in stored:
            stored[key] = real(spec, states, per_step, consts, invariants, length, *args, **kwargs)
        return stored[key]

    solver.run_forward = stored_result
    try:
        yield stored
    finally:
        solver.run_forward = real


def _forward(fn: Callable[..., Any], x: torch.Tensor) -> Callable[[], Any]:
    def call():
        with torch.no_grad():
            return fn(x)

    return call


def measure(layers: int, width: int, batch: int, timer: Timer,
            form: str = "modulelist") -> list[tuple[str, str, float, float, float, str]]:
    """(label, mode, median, p20, p80, note) per variant, in ms per call; `form`: DeepMLP ("modulelist"),
    StackedMLP ("stacked": the same network with its parameters stacked) or DeepMLP's layers held by
    `pcr_compile.StackedLayers` ("stackedlayers"; "stackedlayers-scan" with scan=True)."""
    from pcr_compile.models import DeepMLP, StackedMLP

    torch.manual_seed(0)
    model = (StackedMLP if form == "stacked" else DeepMLP)(layers=layers, width=width)
    if form.startswith("stackedlayers"):  # DeepMLP's (Linear, activation) pairs held by StackedLayers
        from pcr_compile import StackedLayers

        model = StackedLayers((nn.Sequential(model.layers[i], model.layers[i + 1])
                               for i in range(0, len(model.layers), 2)), scan=form.endswith("-scan"))
    x = torch.randn(batch, width)
    dev = torch.device("cpu")
    out = []

    def run(label, mode, fn, note=""):
        call = _forward(fn, x)
        call()  # compile
        out.append((label, mode, *time_call(call, dev, timer), note))
        torch._dynamo.reset()

    run("eager", "-", model)
    run("cached-output", "floor", torch.compile(model, backend=cached_output_backend),
        "torch.compile with a backend returning a stored output: Dynamo's own cost")
    run("cached-output", "floor+guard_filter", torch.compile(model, backend=cached_output_backend,
                                                             options=dict(GUARD_FILTER)),
        "the same with skip_guard_on_all_nn_modules_unsafe")
    run("fresh-output", "floor+fresh_output", torch.compile(model, backend=fresh_output_backend),
        "the floor's backend returning newly allocated outputs each call (as any computing backend does)")
    par = {"mode": "parallel"}
    run("deeppcr", "parallel", torch.compile(model, backend="deeppcr", options=dict(par)), "the real solve")
    with solve_work_removed() as stored:
        run("deeppcr", "parallel-no-solve", torch.compile(model, backend="deeppcr", options=dict(par)),
            "solver.run_forward returns a stored result: host work only")
        run("deeppcr", "parallel-no-solve+guard_filter",
            torch.compile(model, backend="deeppcr", options={**par, **GUARD_FILTER}),
            "the same with skip_guard_on_all_nn_modules_unsafe")
    if not stored:
        raise RuntimeError("the deeppcr forward never called solver.run_forward: no chain was solved")
    return out


def _over_rounds(runs: list[list[tuple]]) -> tuple[list[tuple], dict[str, tuple[float, float, float]]]:
    """Rows of medians over rounds (same variants in the same order each round), and for every deeppcr
    no-solve variant (min, median, max) over rounds of its ratio to that round's own floor."""
    rows = []
    for variant in zip(*runs):
        label, mode, *_, note = variant[0]
        rows.append((label, mode, *(statistics.median(r[k] for r in variant) for k in (2, 3, 4)), note))
    spread = {}
    for run in runs:
        floor = {m: med for lab, m, med, *_ in run if lab == "cached-output"}
        for label, mode, med, *_ in run:
            if label == "deeppcr" and "no-solve" in mode:
                base = floor["floor+guard_filter"] if mode.endswith("guard_filter") else floor["floor"]
                spread.setdefault(mode, []).append(med / base)
    return rows, {m: (min(v), statistics.median(v), max(v)) for m, v in spread.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--form", choices=("modulelist", "stacked", "stackedlayers", "stackedlayers-scan"),
                    default="modulelist",
                    help="DeepMLP (a Sequential of Linear layers), StackedMLP (one stacked parameter per group) or "
                         "DeepMLP's layers in pcr_compile.StackedLayers (scan=False / True)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every variant this many times, one after the other; rows are the medians over "
                         "rounds, and each no-solve ratio is given with its range over rounds")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    torch.set_num_threads(a.threads)
    env = environment(torch.device("cpu"))
    timer = Timer(budget_s=a.budget, min_reps=5, max_reps=2000, warmup=3)
    runs = [measure(a.layers, a.width, a.batch, timer, a.form) for _ in range(a.rounds)]
    res, spread = _over_rounds(runs)
    name = {"stacked": "StackedMLP", "stackedlayers": "StackedLayers(DeepMLP)",
            "stackedlayers-scan": "StackedLayers(DeepMLP, scan=True)"}.get(a.form, "DeepMLP")
    floor = {m: med for lab, m, med, *_ in res if lab == "cached-output"}
    params = f"layers={a.layers},width={a.width},batch={a.batch}"
    params += f",form={a.form}" if a.form != "modulelist" else ""
    rows = []
    print(header(env, f"{name}({a.layers}, {a.width}) batch {a.batch}, forward under no_grad, ms per call"))
    for label, mode, med, p20, p80, note in res:
        base = floor["floor+guard_filter"] if mode.endswith("guard_filter") else floor["floor"]
        ratio = f"{med / base:.2f}x the floor" if label == "deeppcr" and "no-solve" in mode else ""
        if ratio and a.rounds > 1:
            lo, mid, hi = spread[mode]
            ratio += f" (per round: median {mid:.2f}x, {lo:.2f}-{hi:.2f}x over {a.rounds})"
        print(f"  {label:14s} {mode:32s} {med:9.3f} ms (p20 {p20:.3f}, p80 {p80:.3f})  {ratio}")
        rows.append(make_row(env, "deep_mlp", label, mode, params, "host_forward", "ms", med, p20, p80,
                             note=f"{note}{'; ' + ratio if ratio else ''}"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "overhead.csv", rows)
    print(f"rows appended to {out / 'overhead.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
