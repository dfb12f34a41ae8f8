"""Triton implementation of :func:`pcr_compile.kernels.linear_recurrence`: launchers and dispatch.

The kernels live in ``triton_dense.py`` (``w x w`` blocks kept in registers) and ``triton_elementwise.py``
(``"diagonal"`` and ``"identity"``). Both are chunked scans: sequential inside a program with the state in
registers (O(L) work, ``A`` and ``b`` read once), and a two-level variant (chunk summaries, a scan over the
chunks, a rescan from the carries) when the batch alone leaves most of the GPU idle or the chain is long, at
every width. Block widths, warps and the chunk length come from ``settings.py`` (a heuristic, not tuned on
hardware); every launch goes through ``settings.launch`` (device set, launches counted).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests).
Dense blocks wider than ``MAX_DENSE_W`` fall back to the PyTorch PCR (``reference.linear_recurrence_torch``).
"""

from __future__ import annotations

import logging
import os

import torch
import triton

from . import settings
from .reference import linear_recurrence_torch
from .settings import MAX_DENSE_W
from .triton_dense import _dense_chunk_summary_kernel, _dense_scan_kernel
from .triton_elementwise import _elementwise_chunk_summary_kernel, _elementwise_scan_kernel

logger = logging.getLogger(__name__)

__all__ = ["linear_recurrence_triton", "MAX_DENSE_W", "triton_available_for"]


def triton_available_for(t: torch.Tensor) -> bool:
    """True when Triton kernels can run on ``t``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- launchers


def _dense(A: torch.Tensor, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    L, w = b.shape[0], b.shape[-1]
    B = b[0].numel() // w
    A = A.reshape(L, B, w, w).contiguous()  # (L, B, w, w)
    b = b.reshape(L, B, w).contiguous()  # (L, B, w)
    z = torch.empty_like(b)
    dev, ct = b.device, settings.compute_dtype(b.dtype)
    W_PAD = settings.w_pad(w)
    meta = dict(W_PAD=W_PAD, ACC=settings.acc_dtype(b.dtype), num_warps=settings.dense_warps(W_PAD))
    chunk = settings.plan_chunk(B, L, w, ct, settings.device_props(dev), chunk)
    n_chunks = triton.cdiv(L, chunk)
    if n_chunks == 1:
        settings.launch(_dense_scan_kernel, (B, 1), A, b, z, b, L, B, w, L, device=dev,
                        REVERSE=reverse, HAS_CARRY=False, **meta)
        return z
    P = torch.empty(n_chunks - 1, B, w, w, dtype=ct, device=dev)  # composed map of each chunk but the last
    s = torch.empty(n_chunks - 1, B, w, dtype=ct, device=dev)
    settings.launch(_dense_chunk_summary_kernel, (B, n_chunks - 1), A, b, P, s, L, B, w, chunk, device=dev,
                    REVERSE=reverse, USE_DOT=settings.use_dot(W_PAD), PREC=settings.dot_precision(ct), **meta)
    carry = torch.empty_like(s)  # state at the end of each chunk: carry[c] = P[c] carry[c-1] + s[c]
    settings.launch(_dense_scan_kernel, (B, 1), P, s, carry, s, n_chunks - 1, B, w, n_chunks - 1, device=dev,
                    REVERSE=False, HAS_CARRY=False, **meta)
    settings.launch(_dense_scan_kernel, (B, n_chunks), A, b, z, carry, L, B, w, chunk, device=dev,
                    REVERSE=reverse, HAS_CARRY=True, **meta)
    return z


def _elementwise(A: torch.Tensor | None, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    L = b.shape[0]
    N = b[0].numel()
    b = b.reshape(L, N).contiguous()  # (L, N): batch and features flattened
    A = None if A is None else A.reshape(L, N).contiguous()
    has_a = A is not None
    A_arg = A if has_a else b  # never read when HAS_A is False
    z = torch.empty_like(b)
    dev, ct = b.device, settings.compute_dtype(b.dtype)
    BLOCK_N, warps = settings.elementwise_settings(N)
    grid_n = triton.cdiv(N, BLOCK_N)
    chunk = settings.plan_chunk(grid_n, L, 1, ct, settings.device_props(dev), chunk)
    n_chunks = triton.cdiv(L, chunk)
    meta = dict(BLOCK_N=BLOCK_N, ACC=settings.acc_dtype(b.dtype), num_warps=warps)
    if n_chunks == 1:
        settings.launch(_elementwise_scan_kernel, (grid_n, 1), A_arg, b, z, b, L, N, L, device=dev,
                        REVERSE=reverse, HAS_A=has_a, HAS_CARRY=False, **meta)
        return z
    P = torch.empty(n_chunks - 1, N, dtype=ct, device=dev)
    s = torch.empty(n_chunks - 1, N, dtype=ct, device=dev)
    settings.launch(_elementwise_chunk_summary_kernel, (grid_n, n_chunks - 1), A_arg, b, P, s, L, N, chunk,
                    device=dev, REVERSE=reverse, HAS_A=has_a, **meta)
    carry = torch.empty_like(s)
    settings.launch(_elementwise_scan_kernel, (grid_n, 1), P, s, carry, s, n_chunks - 1, N, n_chunks - 1,
                    device=dev, REVERSE=False, HAS_A=True, HAS_CARRY=False, **meta)
    settings.launch(_elementwise_scan_kernel, (grid_n, n_chunks), A_arg, b, z, carry, L, N, chunk, device=dev,
                    REVERSE=reverse, HAS_A=has_a, HAS_CARRY=True, **meta)
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
    two-level scan (default: ``settings.plan_chunk`` from the rows, L, w, dtype and the GPU's SM count; one
    chunk off CUDA).
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
