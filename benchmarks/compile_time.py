"""Compile time and Newton iterations of a deep tanh MLP: deeppcr (mode="parallel") against Inductor.

    python -m benchmarks.compile_time [--layers 1024] [--width 8] [--batch 16]

Each provider runs in a fresh subprocess with an empty Inductor cache directory, so neither pays for or
profits from the other's caches; the first call (Dynamo + backend + Inductor + one forward) is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
import pcr_compile
from pcr_compile.models import DeepMLP
layers, width, batch, provider = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = DeepMLP(layers=layers, width=width, activation="tanh", gain=0.9)
x = torch.randn(batch, width)
with torch.no_grad():
    ref = model(x)
    if provider == "inductor":
        fn = torch.compile(model)
    else:
        fn = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})
    t = time.perf_counter()
    with pcr_compile.record_solves() as solves:
        y = fn(x)
    first = time.perf_counter() - t
err = float((y - ref).abs().max() / ref.abs().max())
its = [s.iterations for s in solves if s.direction == "forward"]
print(json.dumps({"provider": provider, "first_call_s": first, "max_rel_err": err, "newton_iterations": its}))
"""


def measure(provider: str, layers: int, width: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0")
        out = subprocess.run([sys.executable, "-c", CHILD, str(layers), str(width), str(batch), provider],
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1024)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    rows = [measure(p, args.layers, args.width, args.batch) for p in ("deeppcr", "inductor")]
    for r in rows:
        print(json.dumps(r))
    ratio = rows[0]["first_call_s"] / rows[1]["first_call_s"]
    print(f"layers={args.layers} width={args.width} batch={args.batch}: deeppcr first call "
          f"{rows[0]['first_call_s']:.1f} s, inductor {rows[1]['first_call_s']:.1f} s, ratio {ratio:.2f}; "
          f"Newton iterations {rows[0]['newton_iterations']}")


if __name__ == "__main__":
    main()
