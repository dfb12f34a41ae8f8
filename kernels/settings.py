"""Launch settings for every Triton kernel in ``kernels/``: dtypes, block widths, warps, chunk plans, launches.

One place decides them (as Liger-Kernel's ``calculate_settings``), so no table is copied between launchers
and a tuning change lands everywhere at once. Everything here but :func:`launch` is a pure function of
shapes, dtypes and :class:`DeviceProps`, so the CUDA decisions are tested on fake device properties
(``tests/test_launch_planner.py``). Imports without Triton (``acc_dtype`` imports it when called).

Chunk planning (``plan_chunk``). A program of a chunked scan walks ``chunk`` dependent steps; the rows
(batch elements, or column blocks for elementwise scans) give ``rows`` programs per chunk. The chain is cut
into chunks when the rows alone leave the GPU under-filled (fewer than ``PROGRAMS_PER_SM`` programs per SM)
or when it is long (more than ``MAX_CHUNK`` steps per program), never into chunks shorter than
``min_chunk(width)`` steps (the two-level scan composes ``w x w`` maps: its extra work grows with ``w``) and
never into more programs than ``MAX_WAVES`` waves of the GPU. The constants are placeholders until measured
on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

__all__ = [
    "DeviceProps", "device_props", "compute_dtype", "acc_dtype", "dot_precision", "w_pad", "dense_warps",
    "reduce_settings", "elementwise_settings", "plan_chunk", "launch", "launch_count", "LAUNCHES", "to_host",
    "host_read_count",
]

PROGRAMS_PER_SM = 4  # programs per SM that count as a filled GPU
MAX_CHUNK = 256  # longest chunk a program walks when the chain could be cut further
MIN_CHUNK = 16  # shortest chunk worth a program of its own (elementwise; dense grows with w)
MAX_WAVES = 8  # at most this many waves of PROGRAMS_PER_SM * SMs programs from cutting a long chain
MAX_DENSE_W = 64  # widest dense block kept in registers (padded to a power of two)

_DENSE_WARPS = {2: 1, 4: 1, 8: 1, 16: 2, 32: 4, 64: 8}
LAUNCHES = 0  # Triton launches made through launch() since import (benchmarks read it; never reset here)
HOST_READS = 0  # device-to-host reads made through to_host() since import


@dataclass(frozen=True)
class DeviceProps:
    """What the planner needs of a GPU: its SM count (``multi_processor_count``)."""

    sm_count: int
    name: str = ""


@functools.cache
def _cuda_props(index: int) -> DeviceProps:
    p = torch.cuda.get_device_properties(index)
    return DeviceProps(sm_count=p.multi_processor_count, name=p.name)


def device_props(device: torch.device) -> DeviceProps | None:
    """The device's properties, or None off CUDA (the interpreter: no planning, one chunk)."""
    if device.type != "cuda":
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------- dtypes, shapes


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 at least (half types are upcast), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype of ``compute_dtype(dtype)``."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision of the ``w x w`` map products: float32 runs three TF32 tensor-core
    products (``tf32x3``, about float32's accuracy, and far fewer registers than the FMA lowering of
    ``"ieee"``, which spills at w = 64); float64 has no such split and stays ``"ieee"``."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def w_pad(w: int) -> int:
    """Padded block width: the next power of two, at least 2 (``tl.arange`` needs a power of two)."""
    return max(2, 1 << (int(w) - 1).bit_length())


def use_dot(W_PAD: int) -> bool:
    """``tl.dot`` needs every dim >= 16; narrower products are a broadcast-multiply and a reduction."""
    return W_PAD >= 16


def dense_warps(W_PAD: int) -> int:
    """Warps of a program holding ``W_PAD x W_PAD`` blocks: 4-16 elements per thread and block."""
    return _DENSE_WARPS[W_PAD]


def reduce_settings(n: int, W_PAD: int) -> tuple[int, int]:
    """(BLOCK, warps) of the Newton carry kernel: it reduces ``n`` per-program statistics in blocks of
    BLOCK (at most 1024, 4 per thread) and scans ``W_PAD x W_PAD`` maps; warps cover the larger of the two."""
    block = min(max(1 << max(int(n) - 1, 0).bit_length(), 16), 1024)
    return block, max(dense_warps(W_PAD), min(8, max(1, block // 128)))


def elementwise_settings(N: int) -> tuple[int, int]:
    """(BLOCK_N, warps) of the elementwise scans over ``N`` columns: up to 512 columns, 4 per thread."""
    block = min(max(1 << max(int(N) - 1, 0).bit_length(), 16), 512)
    return block, max(1, min(4, block // 128))


# --------------------------------------------------------------------------------------------- planning


def min_chunk(width: int) -> int:
    """Shortest chunk of a two-level scan of ``width``-wide maps (width 1: elementwise)."""
    return MIN_CHUNK if width <= 1 else MIN_CHUNK * max(1, w_pad(width) // 16)


def plan_chunk(rows: int, L: int, width: int, dtype: torch.dtype, props: DeviceProps | None,
               chunk: int | None = None) -> int:
    """Chunk length along L for ``rows`` programs per chunk on a GPU with ``props`` (None: one chunk).

    ``chunk`` forces a length (tests exercise the two-level path under the interpreter with it).
    ``dtype`` is the compute dtype: float64 halves the longest chunk (its steps are twice as slow).
    """
    if chunk is not None:
        return max(1, min(int(chunk), L))
    shortest = min_chunk(width)
    if props is None or L < 2 * shortest:
        return L
    target = PROGRAMS_PER_SM * props.sm_count
    fill = -(-target // max(rows, 1))  # chunks that fill the GPU with these rows
    longest = MAX_CHUNK // (2 if dtype == torch.float64 else 1)
    long = -(-L // longest)  # chunks that keep each program's walk short
    cap = max(1, MAX_WAVES * target // max(rows, 1))  # never more than MAX_WAVES waves
    n_chunks = min(max(fill if rows < target else 1, min(long, cap)), L // shortest)
    return -(-L // max(n_chunks, 1))


# --------------------------------------------------------------------------------------------- launches


def launch(kernel, grid: tuple[int, ...], *args, device: torch.device, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device`` (``torch.cuda.device``; nothing off CUDA), counted."""
    global LAUNCHES
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        kernel[grid](*args, **meta)
    LAUNCHES += 1


def launch_count() -> int:
    """Triton launches made through :func:`launch` so far (take differences around the code measured)."""
    return LAUNCHES


def to_host(t: torch.Tensor) -> list:
    """``t.tolist()``, counted: every device-to-host read of the kernels' launchers and of the solver goes
    through here (one transfer each), so benchmarks count host syncs on a CPU too, where ``.tolist()``
    dispatches no op to see."""
    global HOST_READS
    HOST_READS += 1
    return t.tolist()


def host_read_count() -> int:
    """Reads made through :func:`to_host` so far (take differences around the code measured)."""
    return HOST_READS
