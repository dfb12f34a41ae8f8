"""Micro-benchmark of the PCR kernels and the fused Newton solve: Triton vs PyTorch vs a sequential loop.

    python benchmarks/kernel_bench.py --device cuda --out gpu_out      # on a GPU (Triton, torch, sequential)
    python benchmarks/kernel_bench.py --device cpu --quick             # smoke test: torch and sequential only

``linear_recurrence`` is memory-bound: the reported bound is ``(bytes of A + b read once + z written once)
/ bandwidth`` (``--bandwidth-gbs``; default from the device name, 4800 GB/s for an H200), and ``x_bound``
is the measured time over that bound (1.0 = at the bandwidth limit). Timing: ``triton.testing.do_bench``
(median, p20, p80 in ms) on CUDA; repeated wall-clock medians on CPU. Rows go to ``OUT/kernel_bench.csv``
and ``.json``; a short table is printed and written to ``OUT/kernel_bench_table.txt``. The CSV has the
harness's schema (``benchmarks/output.py``: one row per metric: ``time`` ms, ``bound`` ms, ``x_bound``,
``max_err``, ``iterations``; ``model`` is the bench, ``mode`` the structure, ``parameters`` the shape),
and times come from the harness's one timer (``benchmarks/timing.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (benchmarks/kernel_bench.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.output import environment, make_row, write_csv  # noqa: E402
from benchmarks.timing import Timer, time_call  # noqa: E402
from pcr_compile.kernels import linear_recurrence, linear_recurrence_sequential
from pcr_compile.solver import newton_linear_pointwise

log = logging.getLogger(__name__)

# (structure, L, w, batch, dtype, reverse); the first row is the headline case.
RECURRENCE_CASES = [
    ("dense", 1024, 16, 64, torch.float32, False),
    ("dense", 1024, 16, 64, torch.float32, True),
    ("dense", 1024, 16, 64, torch.bfloat16, False),
    ("dense", 1024, 8, 16, torch.float32, False),
    ("dense", 4096, 4, 4, torch.float32, False),
    ("dense", 256, 32, 64, torch.float32, False),
    ("dense", 1024, 64, 16, torch.float32, False),
    ("diagonal", 1024, 256, 64, torch.float32, False),
    ("diagonal", 4096, 64, 4, torch.float32, True),
    ("identity", 1024, 256, 64, torch.float32, False),
]
QUICK_CASES = [
    ("dense", 128, 8, 4, torch.float32, False),
    ("dense", 128, 8, 4, torch.float32, True),
    ("diagonal", 128, 16, 4, torch.float32, False),
    ("identity", 128, 16, 4, torch.float32, False),
]
# (activation, residual, L, w, batch)
NEWTON_CASES = [("tanh", False, 256, 8, 16), ("tanh", False, 1024, 16, 64), ("gelu", True, 512, 16, 32)]
QUICK_NEWTON = [("tanh", False, 64, 4, 2)]
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def time_fn(fn, device: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms, from the harness's timer (do_bench on CUDA, wall-clock samples on CPU)."""
    timer = Timer(budget_s=0.04 if quick else 0.1, min_reps=3 if quick else 7, max_reps=50 if quick else 200,
                  warmup=2, cuda_warmup_ms=10)
    fn()
    return time_call(fn, torch.device(device), timer)


def csv_rows(rows: list[dict], env) -> list[dict[str, str]]:
    """The benchmark's records as rows of the harness's CSV schema, one per metric."""
    out = []
    for r in rows:
        params = f"L={r['L']},w={r['w']},batch={r['batch']},dtype={r['dtype']},reverse={r['reverse']}"
        note = f"triton {r['triton'] or 'absent'}; {r['bytes']} bytes moved"
        mk = partial(make_row, env, r["bench"], r["provider"], r["structure"], params)
        ok = "ok" if r["median_ms"] == r["median_ms"] else "error"
        out.append(mk("time", "ms", r["median_ms"], r["p20_ms"], r["p80_ms"], status=ok, note=note))
        out.append(mk("bound", "ms", r["bound_ms"], status="model",
                      note="bytes / bandwidth (a model, not a measurement)"))
        out.append(mk("x_bound", "1", r["x_bound"], status=ok))
        out.append(mk("max_err", "1", r["max_err"], status=ok, note="against the float64 sequential recurrence"))
        if r["iterations"] != "":
            out.append(mk("iterations", "iters", float(r["iterations"]), status=ok))
    return out


def make_recurrence(structure, L, w, batch, dtype, device):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(L, batch, w, generator=g, dtype=torch.float64)
    if structure == "dense":
        A = torch.randn(L, batch, w, w, generator=g, dtype=torch.float64) * (0.9 / w**0.5)
    elif structure == "diagonal":
        A = torch.rand(L, batch, w, generator=g, dtype=torch.float64) * 1.9 - 0.95
    else:
        A = None
    return (None if A is None else A.to(device, dtype)), b.to(device, dtype)


def bench_recurrence(args, versions) -> list[dict]:
    rows = []
    providers = ["triton", "torch", "sequential"] if args.device == "cuda" else ["torch", "sequential"]
    for structure, L, w, batch, dtype, reverse in QUICK_CASES if args.quick else RECURRENCE_CASES:
        A, b = make_recurrence(structure, L, w, batch, dtype, args.device)
        nbytes = (0 if A is None else A.numel() * A.element_size()) + 2 * b.numel() * b.element_size()
        bound_ms = nbytes / (args.bandwidth_gbs * 1e9) * 1e3
        A64 = None if A is None else A.double()
        ref = linear_recurrence_sequential(A64, b.double(), structure=structure, reverse=reverse)
        for provider in providers:
            if provider == "sequential":
                fn = partial(linear_recurrence_sequential, A, b, structure=structure, reverse=reverse)
            else:
                fn = partial(linear_recurrence, A, b, structure=structure, reverse=reverse, impl=provider)
            try:
                err = (fn().double() - ref).abs().max().item()
                med, p20, p80 = time_fn(fn, args.device, args.quick)
            except Exception as e:  # keep going: one failing provider must not hide the others
                log.warning("%s %s L=%d w=%d failed: %r", provider, structure, L, w, e)
                med = p20 = p80 = err = float("nan")
            rows.append(dict(bench="linear_recurrence", provider=provider, structure=structure, L=L, w=w,
                             batch=batch, dtype=str(dtype).removeprefix("torch."), reverse=reverse, median_ms=med,
                             p20_ms=p20, p80_ms=p80, bytes=nbytes, bound_ms=bound_ms, x_bound=med / bound_ms,
                             max_err=err, iterations="", **versions))
            print(f"  {provider:10s} {structure:8s} L={L:5d} w={w:3d} B={batch:3d} {rows[-1]['dtype']:8s} "
                  f"rev={int(reverse)} {med:9.4f} ms  x_bound={med / bound_ms:8.1f}  err={err:.1e}", flush=True)
    return rows


def sequential_chain(z0, W, bias, activation, residual):
    act = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation]
    z, out = z0, []
    for layer in range(W.shape[0]):
        a = act(torch.addmm(bias[layer], z, W[layer].T))
        z = z + a if residual else a
        out.append(z)
    return torch.stack(out)


def bench_newton(args, versions) -> list[dict]:
    rows = []
    providers = ["triton", "torch", "sequential"] if args.device == "cuda" else ["torch", "sequential"]
    for activation, residual, L, w, batch in QUICK_NEWTON if args.quick else NEWTON_CASES:
        g = torch.Generator().manual_seed(0)
        scale = (0.1 if residual else 0.3) / w**0.5
        W = (torch.randn(L, w, w, generator=g) * scale).to(args.device)
        bias = (torch.randn(L, w, generator=g) * 0.1).to(args.device)
        z0 = torch.randn(batch, w, generator=g).to(args.device)
        ref = sequential_chain(z0.double(), W.double(), bias.double(), activation, residual)
        nbytes = W.numel() * 4 + bias.numel() * 4 + L * batch * w * 4
        for provider in providers:
            iters = ""
            if provider == "sequential":
                fn = partial(sequential_chain, z0, W, bias, activation, residual)
            else:
                fn = partial(newton_linear_pointwise, z0, W, bias, activation=activation, residual=residual,
                             tol=1e-5, max_iters=30, impl=provider)
            try:
                out = fn()
                traj = out if provider == "sequential" else out.traj
                iters = "" if provider == "sequential" else out.iterations
                err = (traj.double() - ref).abs().max().item()
                med, p20, p80 = time_fn(fn, args.device, args.quick)
            except Exception as e:
                log.warning("newton %s %s L=%d failed: %r", provider, activation, L, e)
                med = p20 = p80 = err = float("nan")
            bound_ms = nbytes / (args.bandwidth_gbs * 1e9) * 1e3
            rows.append(dict(bench="newton_linear_pointwise", provider=provider, structure=activation
                             + ("+res" if residual else ""), L=L, w=w, batch=batch, dtype="float32", reverse=False,
                             median_ms=med, p20_ms=p20, p80_ms=p80, bytes=nbytes, bound_ms=bound_ms,
                             x_bound=med / bound_ms, max_err=err, iterations=iters, **versions))
            print(f"  {provider:10s} newton {rows[-1]['structure']:9s} L={L:5d} w={w:3d} B={batch:3d} "
                  f"{med:9.4f} ms  iters={iters}  err={err:.1e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'bench':24s} {'provider':10s} {'case':34s} {'median ms':>10s} {'x bound':>8s} {'max err':>8s}"]
    for r in rows:
        case = f"{r['structure']} L={r['L']} w={r['w']} B={r['batch']} {r['dtype']}{' rev' if r['reverse'] else ''}"
        lines.append(f"{r['bench']:24s} {r['provider']:10s} {case:34s} {r['median_ms']:10.4f} {r['x_bound']:8.1f} "
                     f"{r['max_err']:8.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="kernel_bench_out")
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke test)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the bound, GB/s (default: by GPU name; 50 on CPU, a rough guess)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), 50.0 if name == "cpu" else 2000.0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    versions = dict(device=name, torch=torch.__version__, triton=triton_version)
    print(f"kernel_bench on {name} (bandwidth {args.bandwidth_gbs:.0f} GB/s for the bound)", flush=True)
    rows = bench_recurrence(args, versions) + bench_newton(args, versions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "kernel_bench.csv"
    csv_path.unlink(missing_ok=True)  # one run per file, as before
    write_csv(csv_path, csv_rows(rows, environment(torch.device(args.device))))
    (out / "kernel_bench.json").write_text(json.dumps(rows, indent=1, default=str))
    text = table(rows)
    (out / "kernel_bench_table.txt").write_text(text + "\n")
    print(text)
    bad = [r for r in rows if not r["max_err"] == r["max_err"] or r["max_err"] > 1e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
