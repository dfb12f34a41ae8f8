"""Triton implementation of :func:`pcr_compile.kernels.linear_recurrence`: launchers and dispatch.

The kernels live in ``triton_dense.py`` (``w x w`` blocks kept in registers) and ``triton_elementwise.py``
(``"diagonal"`` and ``"identity"``). Both are chunked scans: sequential inside a program with the state in
registers (O(L) work, ``A`` and ``b`` read once), and a two-level variant (chunk summaries, a scan over the
chunks, a rescan from the carries) when the batch alone leaves most of the GPU idle. The chunk length is a
heuristic (``plan_chunk``), not tuned on hardware.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).
Dense blocks wider than ``MAX_DENSE_W`` fall back to the PyTorch PCR (``reference.linear_recurrence_torch``).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from .reference import linear_recurrence_torch
from .triton_dense import _dense_chunk_summary_kernel, _dense_scan_kernel
from .triton_elementwise import _elementwise_chunk_summary_kernel, _elementwise_scan_kernel

logger = logging.getLogger(__name__)

__all__ = ["linear_recurrence_triton", "plan_chunk", "MAX_DENSE_W", "triton_available_for"]

MAX_DENSE_W = 64  # widest dense block kept in registers; wider blocks use the PyTorch path
MAX_CHUNKED_W = 32  # the two-level dense variant composes w x w products per step: only for w <= 32
MIN_CHUNK = 32  # shortest chunk worth a program of its own
PROGRAMS_PER_SM = 4


def triton_available_for(t: torch.Tensor) -> bool:
    """True when Triton kernels can run on ``t``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def plan_chunk(n_programs: int, L: int, device: torch.device, chunk: int | None = None) -> int:
    """Chunk length along L: the whole chain unless ``n_programs`` alone would leave the GPU mostly idle.

    ``chunk`` forces a length (tests use it to exercise the two-level path under the interpreter).
    """
    if chunk is not None:
        return max(1, min(int(chunk), L))
    if device.type != "cuda" or L < 2 * MIN_CHUNK:
        return L
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    if 2 * n_programs >= target:
        return L
    n_chunks = min(triton.cdiv(target, n_programs), L // MIN_CHUNK)
    return triton.cdiv(L, n_chunks)


# ---------------------------------------------------------------------------------------------- launchers


def _dense(A: torch.Tensor, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    L, w = b.shape[0], b.shape[-1]
    B = b[0].numel() // w
    A = A.reshape(L, B, w, w).contiguous()  # (L, B, w, w)
    b = b.reshape(L, B, w).contiguous()  # (L, B, w)
    z = torch.empty_like(b)
    W_PAD = max(triton.next_power_of_2(w), 2)
    warps = {2: 1, 4: 1, 8: 1, 16: 2, 32: 4, 64: 8}[W_PAD]
    acc = acc_dtype(b.dtype)
    chunk = plan_chunk(B, L, b.device, chunk) if W_PAD <= MAX_CHUNKED_W else L
    n_chunks = triton.cdiv(L, chunk)
    if n_chunks == 1:
        _dense_scan_kernel[(B, 1)](
            A, b, z, b, L, B, w, L, REVERSE=reverse, HAS_CARRY=False, W_PAD=W_PAD, ACC=acc, num_warps=warps
        )
        return z
    ct = torch.float64 if b.dtype == torch.float64 else torch.float32
    P = torch.empty(n_chunks - 1, B, w, w, dtype=ct, device=b.device)  # composed map of each chunk but the last
    s = torch.empty(n_chunks - 1, B, w, dtype=ct, device=b.device)
    _dense_chunk_summary_kernel[(B, n_chunks - 1)](
        A, b, P, s, L, B, w, chunk, REVERSE=reverse, W_PAD=W_PAD, ACC=acc, USE_DOT=W_PAD >= 32, num_warps=warps
    )
    carry = torch.empty_like(s)  # state at the end of each chunk: carry[c] = P[c] carry[c-1] + s[c]
    _dense_scan_kernel[(B, 1)](
        P, s, carry, s, n_chunks - 1, B, w, n_chunks - 1,
        REVERSE=False, HAS_CARRY=False, W_PAD=W_PAD, ACC=acc, num_warps=warps,
    )
    _dense_scan_kernel[(B, n_chunks)](
        A, b, z, carry, L, B, w, chunk, REVERSE=reverse, HAS_CARRY=True, W_PAD=W_PAD, ACC=acc, num_warps=warps
    )
    return z


def _elementwise(A: torch.Tensor | None, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    L = b.shape[0]
    N = b[0].numel()
    b = b.reshape(L, N).contiguous()  # (L, N): batch and features flattened
    A = None if A is None else A.reshape(L, N).contiguous()
    has_a = A is not None
    A_arg = A if has_a else b  # never read when HAS_A is False
    z = torch.empty_like(b)
    BLOCK_N = min(max(triton.next_power_of_2(N), 16), 512)
    warps = max(1, min(4, BLOCK_N // 128))
    grid_n = triton.cdiv(N, BLOCK_N)
    acc = acc_dtype(b.dtype)
    chunk = plan_chunk(grid_n, L, b.device, chunk)
    n_chunks = triton.cdiv(L, chunk)
    meta = dict(BLOCK_N=BLOCK_N, ACC=acc, num_warps=warps)
    if n_chunks == 1:
        _elementwise_scan_kernel[(grid_n, 1)](
            A_arg, b, z, b, L, N, L, REVERSE=reverse, HAS_A=has_a, HAS_CARRY=False, **meta
        )
        return z
    ct = torch.float64 if b.dtype == torch.float64 else torch.float32
    P = torch.empty(n_chunks - 1, N, dtype=ct, device=b.device)
    s = torch.empty(n_chunks - 1, N, dtype=ct, device=b.device)
    _elementwise_chunk_summary_kernel[(grid_n, n_chunks - 1)](
        A_arg, b, P, s, L, N, chunk, REVERSE=reverse, HAS_A=has_a, **meta
    )
    carry = torch.empty_like(s)
    _elementwise_scan_kernel[(grid_n, 1)](
        P, s, carry, s, n_chunks - 1, N, n_chunks - 1, REVERSE=False, HAS_A=True, HAS_CARRY=False, **meta
    )
    _elementwise_scan_kernel[(grid_n, n_chunks)](
        A_arg, b, z, carry, L, N, chunk, REVERSE=reverse, HAS_A=has_a, HAS_CARRY=True, **meta
    )
    return z


# ------------------------------------------------------------------------------------------ public function


def linear_recurrence_triton(
    A: torch.Tensor | None, b: torch.Tensor, *, structure: str, reverse: bool = False, chunk: int | None = None
) -> torch.Tensor:
    """Triton solve of ``z[l] = A[l] z[l-1] + b[l]`` (``reverse=True``: ``z[l] = A[l+1]^T z[l+1] + b[l]``).

    Shapes and semantics as :func:`pcr_compile.kernels.linear_recurrence` (which validates the inputs):
    ``b`` ``(L, *batch, w)``; ``A`` ``(L, *batch, w, w)`` (dense), ``(L, *batch, w)`` (diagonal) or ``None``
    (identity). Returns ``z`` in ``b``'s shape and dtype; half types accumulate in float32, float64 in float64.

    Dense ``w > MAX_DENSE_W`` (64) falls back to the PyTorch PCR. ``chunk`` forces the chunk length of the
    two-level scan (default: a heuristic from the batch size and the GPU's SM count; one chunk on CPU).
    Needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before Triton is imported (CPU interpreter).
    """
    if not triton_available_for(b):
        raise RuntimeError("linear_recurrence_triton needs CUDA tensors or TRITON_INTERPRET=1 (CPU interpreter)")
    shape = b.shape
    if structure == "dense":
        if b.shape[-1] > MAX_DENSE_W:
            logger.debug("dense w=%d > %d: PyTorch fallback", b.shape[-1], MAX_DENSE_W)
            return linear_recurrence_torch(A, b, structure=structure, reverse=reverse)
        z = _dense(A, b, reverse, chunk)
    elif structure in ("diagonal", "identity"):
        z = _elementwise(A if structure == "diagonal" else None, b, reverse, chunk)
    else:
        raise ValueError(f"structure must be 'dense', 'diagonal' or 'identity', got {structure!r}")
    return z.reshape(shape)
