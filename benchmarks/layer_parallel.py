"""Layer-parallel chains on CPU gloo: what each Newton iteration exchanges, and wall time at 1 / 2 / 4 ranks.

    python -m benchmarks.layer_parallel [--layers 256] [--width 8] [--batch 4] [--ranks 1 2 4] [--out DIR]

One chain `z_l = tanh(z_{l-1} W_l^T + b_l)` (float32, DeepMLP-like, gain 0.9), forward + backward through
`pcr_compile.distributed.layer_parallel` on P spawned gloo ranks (loopback), against eager sequential
evaluation in one process. Per solve and per iteration: collectives issued and bytes each rank sends
(from the solve's `ExchangeStats`); the single-device solve issues no collective (its per-iteration sync
is one host read). Rows go to `DIR/layer_parallel.csv` in the harness's schema (benchmarks/output.py).
Each rank runs one intra-op thread; on a machine with fewer cores than ranks the ranks share cores, so
wall times then measure contention, not the algorithm's scaling.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .output import COLUMNS, environment, make_row


def _chain(L, w, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, w, w, generator=g) * 0.9 / w ** 0.5
    b = torch.randn(L, w, generator=g) * 0.1
    z0 = torch.randn(B, w, generator=g)
    return W, b, z0


def _step(p, z):
    W, b = p
    return torch.tanh(z @ W.T + b)


def _rank(rank, world, port, L, w, B, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from pcr_compile.distributed import layer_parallel as lp

    W, b, z0 = _chain(L, w, B)
    sizes = lp.split_sizes(L, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    times = []
    for i in range(repeats + 1):
        Wl, bl = W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        lp.clear_records()
        dist.barrier()
        t0 = time.perf_counter()
        z = lp.layer_parallel(_step, (Wl, bl), z0, L=L)
        z.sum().backward()
        dist.barrier()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    if rank == 0:
        fwd, bwd = lp.records()
        torch.save({"times": times, "fwd": fwd, "bwd": bwd}, out)
    dist.destroy_process_group()


def _eager(L, w, B, repeats):
    torch.set_num_threads(1)
    W, b, z0 = _chain(L, w, B)
    times = []
    for i in range(repeats + 1):
        Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
        t0 = time.perf_counter()
        z = z0
        for l in range(L):
            z = _step((Wr[l], br[l]), z)
        z.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dist_helpers import free_port

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    params = f"L={a.layers} w={a.width} B={a.batch} float32"
    cores = os.cpu_count()
    rows = []
    eager = _eager(a.layers, a.width, a.batch, a.repeats)
    rows.append(make_row(env, "chain-tanh", "eager", "forward_backward", params, "wall", "ms",
                         statistics.median(eager) * 1e3, note=f"sequential, one process; {cores} cores"))
    print(f"eager sequential fwd+bwd: {statistics.median(eager) * 1e3:.1f} ms ({cores} cores)")
    for P in a.ranks:
        res = out / f"layer_parallel_{P}.pt"
        mp.start_processes(_rank, args=(P, free_port(), a.layers, a.width, a.batch, a.repeats, str(res)),
                           nprocs=P, start_method="spawn")
        r = torch.load(res, weights_only=False)
        fwd, bwd = r["fwd"], r["bwd"]
        t = statistics.median(r["times"]) * 1e3
        # rank 0 sends the step count (8 B) once, and z_L (B w 4 B) only when it is also the last rank
        per_iter = (fwd.bytes_sent - 8 - a.batch * a.width * 4 * (P == 1)) / (fwd.iterations + 1)
        note = (f"{P} gloo ranks on {cores} cores (ranks share cores when P > cores); forward "
                f"{fwd.iterations + 1} evaluations, {fwd.collectives} collectives; backward {bwd.collectives}")
        print(f"P={P}: fwd+bwd {t:.1f} ms; forward: {fwd.iterations} iterations (+1 check), {fwd.collectives} "
              f"collectives, {fwd.bytes_sent} B sent by rank 0 (~{per_iter:.0f} B per iteration); backward: "
              f"{bwd.collectives} collectives, {bwd.bytes_sent} B; converged {fwd.converged}/{bwd.converged}")
        mk = lambda metric, unit, v, n=note, p=P: make_row(env, "chain-tanh", f"layer-parallel-{p}", "forward_backward",
                                                           params, metric, unit, v, note=n)
        rows += [mk("wall", "ms", t), mk("forward_collectives", "count", fwd.collectives),
                 mk("forward_bytes_sent", "bytes", fwd.bytes_sent),
                 mk("bytes_per_iteration", "bytes", per_iter), mk("forward_evaluations", "count", fwd.iterations + 1),
                 mk("backward_collectives", "count", bwd.collectives), mk("backward_bytes_sent", "bytes",
                                                                         bwd.bytes_sent)]
    path = out / "layer_parallel.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            wr.writeheader()
        wr.writerows(rows)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
