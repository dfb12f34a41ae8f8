"""Default-mode overhead: deeppcr with its default options against Inductor alone, first call and run time.

    python -m benchmarks.default_mode [--models mlp,resmlp,resnet] [--pairs 3] [--train]
    python -m benchmarks.default_mode child MODEL PROVIDER [--train]      # one measurement, one JSON line

With the default options on the CPU (`mode="auto"`) every chain is kept sequential, so the backend's whole
contribution is finding the chains and deciding; what it then compiles is Inductor's graph. Its first call
should cost what Inductor's does. Each measurement runs in a fresh process with a fresh, empty Inductor
cache (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR in a new temporary directory, set before torch is
imported) on one intra-op thread; the providers alternate A B A B so that drift of a shared machine falls on
both. The child reports the first call's wall time (Dynamo + backend + AOTAutograd + Inductor + one call),
the time spent inside `pcr_compile.backend.rewrite` (deeppcr only; the chain finder and the decision, timed
by wrapping that function from here) and the median of repeated calls after compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# name -> (constructor expression, input shape); small enough that Inductor compiles each in seconds on the
# shared 2-core machine (DeepMLP(256, 16) took 60-70 s a first call there, too long for repeated pairs).
MODELS = {
    "mlp": ("DeepMLP(layers=64, width=16)", (16, 16)),
    "resmlp": ("ResidualMLP(blocks=16, width=16)", (16, 16)),
    "resnet": ("ConvResNet(blocks=8, channels=8)", (4, 3, 8, 8)),
}
PROVIDERS = ("deeppcr", "inductor")


def child(model_name: str, provider: str, train: bool, reps: int = 30) -> dict:
    import time

    import torch

    import pcr_compile.backend as backend
    from pcr_compile import models

    torch.set_num_threads(1)
    spent = {"rewrite_s": 0.0, "rewrites": 0}
    real_rewrite = backend.rewrite

    def timed_rewrite(gm, options):
        t = time.perf_counter()
        try:
            return real_rewrite(gm, options)
        finally:
            spent["rewrite_s"] += time.perf_counter() - t
            spent["rewrites"] += 1

    backend.rewrite = timed_rewrite
    expr, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = eval(expr, vars(models))  # noqa: S307 -- a constant of this module
    x = torch.randn(shape)
    fn = torch.compile(model) if provider == "inductor" else torch.compile(model, backend="deeppcr")

    def call():
        if train:
            for p in model.parameters():
                p.grad = None
            fn(x).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                fn(x)

    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    for _ in range(3):
        call()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return {"model": model_name, "expr": expr, "provider": provider, "train": train, "first_call_s": first,
            "run_ms_median": statistics.median(times), "run_ms_min": min(times), **spent}


def measure(model_name: str, provider: str, train: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        cmd = [sys.executable, "-m", "benchmarks.default_mode", "child", model_name, provider]
        out = subprocess.run(cmd + (["--train"] if train else []), env=env, capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", help="`child MODEL PROVIDER` runs one measurement")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="a training step instead of a forward under no_grad")
    a = ap.parse_args(argv)
    if a.what:
        if len(a.what) != 3 or a.what[0] != "child":
            ap.error("expected: child MODEL PROVIDER")
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") is None:  # run by hand: still a fresh cache
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_")
        print(json.dumps(child(a.what[1], a.what[2], a.train)), flush=True)
        return 0
    for name in a.models.split(","):
        runs = {p: [] for p in PROVIDERS}
        for _ in range(a.pairs):
            for p in PROVIDERS:  # A B A B
                r = measure(name, p, a.train)
                runs[p].append(r)
                print(json.dumps(r), flush=True)
        med = {p: statistics.median(r["first_call_s"] for r in runs[p]) for p in PROVIDERS}
        ratios = [d["first_call_s"] / i["first_call_s"] for d, i in zip(runs["deeppcr"], runs["inductor"])]
        run_ms = {p: statistics.median(r["run_ms_median"] for r in runs[p]) for p in PROVIDERS}
        rw = statistics.median(r["rewrite_s"] for r in runs["deeppcr"])
        print(f"{MODELS[name][0]} {'train' if a.train else 'forward'}: first call deeppcr {med['deeppcr']:.2f} s, "
              f"inductor {med['inductor']:.2f} s, ratio per pair {[round(x, 3) for x in ratios]} "
              f"(median {statistics.median(ratios):.3f}); inside deeppcr's rewrite {rw:.2f} s; run time "
              f"deeppcr {run_ms['deeppcr']:.3f} ms, inductor {run_ms['inductor']:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
