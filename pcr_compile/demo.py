"""`make demo`: compile a deep MLP with the deeppcr backend and compare it with eager and Inductor.

    python -m pcr_compile.demo [--layers 256] [--width 8] [--batch 16]

Prints the chains found, the Newton iterations of the forward and backward solves, the error against
eager, and wall-clock times on this machine (first call: trace, compile from empty caches, forward and
backward; forward: median of repeated no-grad calls) (CPU here: see README for why the parallel solve is a GPU
effect and why mode="auto" keeps CPU chains sequential).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pcr_compile
from pcr_compile.models import DeepMLP


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = DeepMLP(layers=args.layers, width=args.width, activation="tanh", gain=0.9)
    x = torch.randn(args.batch, args.width)
    print(f"DeepMLP: {args.layers} x (Linear({args.width}, {args.width}) + tanh), batch {args.batch}\n")

    report = pcr_compile.explain(model, x, options={"mode": "parallel"})
    print(report.chain_table(), "\n")

    from torch._inductor.utils import fresh_cache  # first calls compile from empty caches, as a user's would

    results = {}
    for name, compiled in [("eager", model),
                           ("inductor", torch.compile(model)),
                           ("deeppcr", torch.compile(model, backend="deeppcr", options={"mode": "parallel"}))]:
        torch._dynamo.reset()
        with fresh_cache():
            t = time.perf_counter()
            with pcr_compile.record_solves() as solves:
                y = compiled(x)
                y.pow(2).mean().backward()
            first = time.perf_counter() - t
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)

        def fwd(fn=compiled):
            with torch.no_grad():
                fn(x)

        results[name] = dict(y=y.detach(), grads=grads, first=first, fwd=_median_time(fwd, args.repeats),
                             solves=list(solves))

    ref = results["eager"]
    print(f"{'provider':10} {'first call (s)':>15} {'forward (ms)':>13} {'max rel err':>12} {'grad rel err':>13}")
    for name, r in results.items():
        err = float((r["y"] - ref["y"]).abs().max() / ref["y"].abs().max())
        gscale = max(float(g0.abs().max()) for g0 in ref["grads"])
        gerr = max(float((g - g0).abs().max()) for g, g0 in zip(r["grads"], ref["grads"])) / gscale
        print(f"{name:10} {r['first']:15.2f} {1e3 * r['fwd']:13.2f} {err:12.2e} {gerr:13.2e}")
    print()
    for s in results["deeppcr"]["solves"]:
        print(f"deeppcr {s.direction:8} solve: {s.iterations} iterations, residual {s.residual:.1e}, "
              f"converged={s.converged}, fell_back={s.fell_back}")


if __name__ == "__main__":
    main()
