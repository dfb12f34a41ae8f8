"""How far apart two training runs of a deep conv ResNet drift: deeppcr against eager, and the controls.

    python -m benchmarks.training_drift [--blocks 1024] [--steps 100] [--lr 0.3] [--depth-scaling forward]
                                        [--runs eager-noise,eager-f64,deeppcr]

Every run trains `ConvResNet(blocks, channels=4)` with plain SGD on the same four synthetic batches (the
set-up of the slow test in tests/test_residual.py) and is compared with eager float32, step by step
(relative difference of the losses). The controls show what eager itself amounts to:

- `eager-noise`: eager again, every weight multiplied by (1 + 1e-7 * N(0, 1)) at the start (rounding-level);
- `eager-f64`: eager in float64;
- `deeppcr`: `torch.compile(backend="deeppcr", options={"mode": "parallel"})`.

If the controls drift as far as deeppcr, the drift is the training's sensitivity, not the solver's.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

import pcr_compile
from pcr_compile.models import ConvResNet

RUNS = ("eager-noise", "eager-f64", "deeppcr")


def train(step_fn, params, data, steps: int, lr: float) -> list[float]:
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(step_fn(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--depth-scaling", choices=("init", "forward"), default="forward")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUNS:
            ap.error(f"--runs: unknown run {r!r} (choose from {', '.join(RUNS)})")

    torch.manual_seed(0)
    ref = ConvResNet(blocks=args.blocks, channels=4, in_channels=3, num_classes=5, depth_scaling=args.depth_scaling)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    curves, seconds, notes = {}, {}, {}

    def timed(name, step_fn, params, batches):
        t = time.perf_counter()
        curves[name] = train(step_fn, params, batches, args.steps, args.lr)
        seconds[name] = time.perf_counter() - t

    for name in ["eager", *runs]:
        model = copy.deepcopy(ref)
        if name == "eager":
            timed(name, model, model.parameters(), data)
        elif name == "eager-noise":
            noise = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=noise))
            timed(name, model, model.parameters(), data)
        elif name == "eager-f64":
            model = model.double()
            timed(name, model, model.parameters(), [(x.double(), y) for x, y in data])
        else:
            compiled = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})
            with pcr_compile.record_solves() as solves:
                timed(name, compiled, model.parameters(), data)
            fwd = [s.iterations for s in solves if s.direction == "forward"]
            bwd = [s.iterations for s in solves if s.direction == "backward"]
            notes[name] = (f"iterations fwd {min(fwd)}-{max(fwd)}, adjoint {min(bwd)}-{max(bwd)}, "
                           f"fallbacks {sum(s.fell_back for s in solves)}")

    base = curves["eager"]
    marks = sorted({min(args.steps, m) - 1 for m in (1, 10, 25, 40, 55, 70, 85, 100, args.steps)})
    rows = []
    for name in runs:
        rel = [abs(a - b) / abs(b) for a, b in zip(curves[name], base)]
        worst = [max(rel[: m + 1]) for m in marks]
        rows.append([name, *(f"{w:.1e}" for w in worst), f"{seconds[name]:.0f}", notes.get(name, "")])
    print(f"ConvResNet blocks={args.blocks} channels=4, SGD lr={args.lr}, depth_scaling={args.depth_scaling!r}, "
          f"{args.steps} steps; eager loss {base[0]:.4f} -> {base[-1]:.4f} ({seconds['eager']:.0f} s)")
    print("worst relative loss difference from eager float32 up to each step:")
    print(tabulate(rows, headers=["run", *(f"step {m + 1}" for m in marks), "s", "notes"]))


if __name__ == "__main__":
    main()
