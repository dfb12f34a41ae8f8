"""Triton implementation of :func:`pcr_compile.kernels.linear_recurrence`: the dispatch.

The kernels and their launchers live in ``triton_dense.py`` (``w x w`` blocks kept in registers) and
``triton_elementwise.py`` (``"diagonal"`` and ``"identity"``). Both are chunked scans: sequential inside a
program with the state in registers (O(L) work, ``A`` and ``b`` read once), and a two-level variant (chunk
summaries, a scan over the chunks, a rescan from the carries) when the batch alone leaves most of the GPU idle
or the chain is long, at every width. Block widths, warps and the chunk length come from ``settings.py`` (a
heuristic, not tuned on hardware); every launch goes through ``settings.launch`` (device set, launches counted).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests). Dense
blocks wider than ``MAX_DENSE_W`` fall back to the PyTorch PCR (``reference.linear_recurrence_torch``).
"""

from __future__ import annotations

import logging
import os

import torch

from .reference import linear_recurrence_torch
from .settings import MAX_DENSE_W
from .triton_dense import dense_scan
from .triton_elementwise import elementwise_scan

log = logging.getLogger(__name__)

__all__ = ["linear_recurrence_triton", "MAX_DENSE_W", "triton_available_for"]


def triton_available_for(t: torch.Tensor) -> bool:
    """True when Triton kernels can run on ``t``: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


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
            log.debug("dense w=%d > %d: PyTorch fallback", b.shape[-1], MAX_DENSE_W)
            return linear_recurrence_torch(A, b, structure=structure, reverse=reverse)
        z = dense_scan(A, b, reverse, chunk)
    elif structure in ("diagonal", "identity"):
        z = elementwise_scan(A if structure == "diagonal" else None, b, reverse, chunk)
    else:
        raise ValueError(f"structure must be 'dense', 'diagonal' or 'identity', got {structure!r}")
    return z.reshape(shape)
