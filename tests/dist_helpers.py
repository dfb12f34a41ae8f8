"""Spawning gloo process groups inside a test: loopback only, a free port, a time bound.

`run_ranks(fn, world, *args)` starts `world` processes (spawn), each joining a gloo group on 127.0.0.1 and
calling `fn(rank, world, *args)`; an exception in any rank fails the test with that rank's traceback, and
the whole group is killed past `timeout` seconds.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo unavailable")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> None:
    try:
        import torch.multiprocessing as mp

        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                                 start_method="spawn")
    except (OSError, RuntimeError) as e:  # no multiprocessing here
        pytest.skip(f"cannot spawn processes: {e}")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout} s")
