"""Compile time and Newton iterations of a deep tanh MLP: deeppcr (mode="parallel") against Inductor.

    python -m benchmarks.compile_time [--layers 1024] [--width 8] [--batch 16] [--form modulelist|stacked]
                                      [--guard-filter] [--floor]

Each provider runs in a fresh subprocess with an empty Inductor cache directory, so neither pays for or
profits from the other's caches; the first call (Dynamo + backend + Inductor + one forward) is timed.
`--form stacked`: the same network with its parameters stacked (`StackedMLP`); `stackedlayers` /
`stackedlayers-scan`: DeepMLP's layers in `pcr_compile.StackedLayers` (`scan=False` / `True`);
`--inductor-form`: what Inductor compiles instead (it fails on the scan form). `--guard-filter`: every
provider compiles with `options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}`.
`--floor`: a third provider, Dynamo with a backend that runs the captured graph as it is
(`providers.cached_output_backend`): the part of the first call every backend pays.
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
from pcr_compile.models import DeepMLP, StackedMLP
layers, width, batch, provider = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
form, guard_filter = sys.argv[5], sys.argv[6] == "1"
extra = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if guard_filter else {}
torch.manual_seed(0)
model = (StackedMLP if form == "stacked" else DeepMLP)(layers=layers, width=width, activation="tanh", gain=0.9)
if form.startswith("stackedlayers"):  # DeepMLP's (Linear, Tanh) pairs in pcr_compile.StackedLayers
    model = pcr_compile.StackedLayers((torch.nn.Sequential(model.layers[i], model.layers[i + 1])
                                       for i in range(0, len(model.layers), 2)), scan=form.endswith("-scan"))
x = torch.randn(batch, width)
with torch.no_grad():
    ref = model(x)
    if provider == "inductor":
        fn = torch.compile(model, options=extra or None)
    elif provider == "dynamo-floor":
        from benchmarks.providers import cached_output_backend
        fn = torch.compile(model, backend=cached_output_backend, options=extra or None)
    else:
        fn = torch.compile(model, backend="deeppcr", options={"mode": "parallel", **extra})
    t = time.perf_counter()
    with pcr_compile.record_solves() as solves:
        y = fn(x)
    first = time.perf_counter() - t
err = float((y - ref).abs().max() / ref.abs().max())
its = [s.iterations for s in solves if s.direction == "forward"]
print(json.dumps({"provider": provider, "first_call_s": first, "max_rel_err": err, "newton_iterations": its}))
"""


FORMS = ("modulelist", "stacked", "stackedlayers", "stackedlayers-scan")


def measure(provider: str, layers: int, width: int, batch: int, form: str = "modulelist",
            guard_filter: bool = False) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports benchmarks.providers
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        out = subprocess.run([sys.executable, "-c", CHILD, str(layers), str(width), str(batch), provider, form,
                              "1" if guard_filter else "0"], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1024)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--form", choices=FORMS, default="modulelist")
    ap.add_argument("--inductor-form", choices=FORMS, default=None,
                    help="the form Inductor compiles (default: --form; Inductor fails on the scan form)")
    ap.add_argument("--guard-filter", action="store_true",
                    help="compile every provider with guard_filter_fn=skip_guard_on_all_nn_modules_unsafe")
    ap.add_argument("--floor", action="store_true", help="also time Dynamo with a pass-through backend")
    args = ap.parse_args(argv)
    providers = ("deeppcr", "inductor") + (("dynamo-floor",) if args.floor else ())
    rows = [measure(p, args.layers, args.width, args.batch,
                    args.inductor_form or args.form if p == "inductor" else args.form, args.guard_filter)
            for p in providers]
    for r in rows:
        print(json.dumps(r))
    ratio = rows[0]["first_call_s"] / rows[1]["first_call_s"]
    first = [r["first_call_s"] for r in rows]
    floor = f", Dynamo floor {first[2]:.1f} s ({first[2] / first[1]:.2f})" if args.floor else ""
    print(f"layers={args.layers} width={args.width} batch={args.batch} form={args.form} "
          f"inductor_form={args.inductor_form or args.form} "
          f"guard_filter={args.guard_filter}: deeppcr first call {first[0]:.1f} s, inductor "
          f"{first[1]:.1f} s, ratio {ratio:.2f}{floor}; Newton iterations {rows[0]['newton_iterations']}")


if __name__ == "__main__":
    main()
