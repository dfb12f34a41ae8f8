"""The headline measurement: eager vs Inductor vs ``reduce-overhead`` vs deeppcr, end to end.

Cases: ``DeepMLP(1024, 16)`` (tanh) at batch 16, forward (no grad) and training step (forward, backward,
SGD update), and a DDIM sampler (``DDIMSampler(MLPDenoiser())``, 100 steps, batch 64), forward.
Each provider is compiled (first call, timed separately as ``compile_s``), checked against eager
(``rel_err``: max |y - y_eager| / max |y_eager|) and timed: CUDA-synchronised wall clock, median and p20/p80
over repetitions within ``--budget-s`` per (case, provider). deeppcr runs with ``mode="parallel"`` and
reports the Newton iterations of its solves and the Triton launches per call (``settings.launch_count``).

    python benchmarks/headline.py --out gpu_out            # on the GPU (gpu_check.sh runs it)
    python benchmarks/headline.py --dry-run --out /tmp/x   # tiny sizes on CPU (the rehearsal)
    python benchmarks/headline.py --warm                   # each deeppcr case once, untimed (Triton cache)

Writes ``OUT/headline.csv`` (one row per case and provider) and prints a table. Exit status 1 when a
provider's result is off eager by more than ``--max-err`` or a provider failed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pcr_compile  # noqa: E402
from pcr_compile.kernels import settings  # noqa: E402
from pcr_compile.models import DDIMSampler, DeepMLP, MLPDenoiser  # noqa: E402

PROVIDERS = ("eager", "inductor", "reduce-overhead", "deeppcr")
FIELDS = ("case", "provider", "median_ms", "p20_ms", "p80_ms", "reps", "compile_s", "x_eager", "rel_err",
          "iterations", "launches", "error", "device", "torch", "size")


def build_cases(dry: bool, device: str):
    """(name, model, inputs, train) per case, on ``device``; tiny sizes for the dry run."""
    torch.manual_seed(0)
    layers, width, batch = (16, 4, 2) if dry else (1024, 16, 16)
    mlp = DeepMLP(layers=layers, width=width, activation="tanh", gain=0.9).to(device)
    x = torch.randn(batch, width, device=device)
    steps, sb = (8, 4) if dry else (100, 64)
    sampler = DDIMSampler(MLPDenoiser(dim=2, hidden=16 if dry else 64), steps=steps).to(device)
    xs = torch.randn(sb, 2, device=device)
    size_mlp, size_s = f"DeepMLP({layers}, {width}) batch {batch}", f"DDIM {steps} steps batch {sb}"
    return [("mlp_forward", mlp, x, False, size_mlp), ("mlp_train_step", mlp, x, True, size_mlp),
            ("ddim_forward", sampler, xs, False, size_s)]


def make_step(model, train: bool, provider: str):
    if provider == "eager":
        fn = model
    elif provider == "inductor":
        fn = torch.compile(model)
    elif provider == "reduce-overhead":
        fn = torch.compile(model, mode="reduce-overhead")
    else:
        fn = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        if not train:
            with torch.no_grad():
                return fn(x).detach().clone()
        for p in params:
            p.grad = None
        y = fn(x)
        y.float().pow(2).mean().backward()
        with torch.no_grad():
            for p in params:  # SGD with lr 0 keeps the weights (and so every provider's inputs) unchanged
                p.add_(p.grad, alpha=-0.0)
        return y.detach().clone()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, x, device: str, budget_s: float, min_reps: int, max_reps: int) -> list[float]:
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        sync(device)
        t0 = time.perf_counter()
        step(x)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_case(case, provider, args, eager_out, eager_ms):
    name, model, x, train, size = case
    row = dict(case=name, provider=provider, device=args.device_name, torch=torch.__version__, size=size, error="")
    torch._dynamo.reset()
    try:
        step = make_step(model, train, provider)
        sync(args.device)
        t0 = time.perf_counter()
        with pcr_compile.record_solves() as solves:
            y = step(x)
        sync(args.device)
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        if provider == "deeppcr":
            row["iterations"] = "/".join(str(s.iterations) for s in solves) or "none"
        if eager_out is not None:
            ref = eager_out.double()
            row["rel_err"] = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if args.warm:
            return row, y
        step(x)  # a second untimed call: CUDA graphs record on it under reduce-overhead
        before = settings.launch_count()
        step(x)
        sync(args.device)
        row["launches"] = settings.launch_count() - before
        times = time_step(step, x, args.device, args.budget_s, args.min_reps, args.max_reps)
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
        row.update(median_ms=round(statistics.median(times), 4), p20_ms=round(q[0], 4), p80_ms=round(q[3], 4),
                   reps=len(times))
        if eager_ms:
            row["x_eager"] = round(eager_ms / row["median_ms"], 2)
        return row, y
    except Exception as e:  # noqa: BLE001 -- a failed provider is a row, the others still run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
        return row, None


def table(rows: list[dict]) -> str:
    head = f"{'case':16} {'provider':16} {'median ms':>10} {'x eager':>8} {'compile s':>9} {'rel err':>9} {'iters':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = f"{r['rel_err']:.1e}" if isinstance(r.get("rel_err"), float) else ""
        med = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else "-"
        lines.append(f"{r['case']:16} {r['provider']:16} {med:>10} {r.get('x_eager', ''):>8} "
                     f"{r.get('compile_s', ''):>9} {err:>9} {r.get('iterations', ''):>7}"
                     + (f"  ERROR {r['error'][:60]}" if r["error"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="headline_out")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--warm", action="store_true", help="run each case once, untimed, to fill the compile caches")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--budget-s", type=float, default=3.0, help="timing budget per (case, provider)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--max-err", type=float, default=1e-3)
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.dry_run:
        args.budget_s, args.min_reps, args.max_reps = 0.0, 2, 2
    providers = [q for q in args.providers.split(",") if q]
    if args.warm:
        providers = [q for q in providers if q in ("eager", "deeppcr")]
    rows = []
    for case in build_cases(args.dry_run, args.device):
        eager_out, eager_ms = None, None
        for provider in providers:
            row, y = run_case(case, provider, args, eager_out, eager_ms)
            if provider == "eager":
                eager_out, eager_ms = y, row.get("median_ms")
            rows.append(row)
            print(f"{row['case']} {row['provider']}: {row.get('median_ms')} ms, compile {row.get('compile_s')} s,"
                  f" rel err {row.get('rel_err')}, iterations {row.get('iterations', '')}"
                  f"{' ERROR ' + row['error'] if row['error'] else ''}", flush=True)
    bad = [r for r in rows if r["error"] or (isinstance(r.get("rel_err"), float) and not r["rel_err"] <= args.max_err)]
    if args.warm:
        return 1 if bad else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "headline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(table(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
