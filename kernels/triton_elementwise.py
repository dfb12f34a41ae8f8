"""Triton chunked scan for the elementwise linear recurrences: ``"diagonal"`` and ``"identity"`` (prefix sum).

The batch and feature dims are flattened into ``N`` independent columns: ``b`` is ``(L, N)``, ``A`` is
``(L, N)`` (or absent). Each program owns a block of ``BLOCK_N`` contiguous columns (coalesced loads) and
one chunk of the chain, sequential over its steps with the state in registers. The two-level variant for
few columns mirrors ``triton_dense.py``: chunk summaries (``P_c`` is a vector here, the product of the
chunk's coefficients), a scan over them, then every chunk rescanned from its carry.

Solve order ``n = 0..L-1``: position ``l = n`` forward, ``l = L-1-n`` for the adjoint with coefficient
``A[L-n]`` (a diagonal matrix is its own transpose). References: Blelloch (1990) prefix sums;
Martin & Cundy, "Parallelizing linear recurrent neural nets over sequence length" (ICLR 2018).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_step(A_ptr, b_ptr, n, L, N, offs, mask, REVERSE: tl.constexpr, HAS_A: tl.constexpr, ACC: tl.constexpr):
    """Coefficient t and offset v of solve step n: forward (A[n], b[n]); adjoint (A[L-n], b[L-1-n]).

    Step 0 has no predecessor: t = 0 there. Identity structure: t = 1 (a running sum).
    """
    if REVERSE:
        pos = L - 1 - n
        aidx = L - n
    else:
        pos = n
        aidx = n
    row = pos.to(tl.int64) * N
    v = tl.load(b_ptr + row + offs, mask=mask, other=0.0).to(ACC)
    if HAS_A:
        t = tl.load(A_ptr + aidx.to(tl.int64) * N + offs, mask=mask & (n > 0), other=0.0).to(ACC)
    else:
        t = tl.where(n > 0, 1.0, 0.0).to(ACC) + tl.zeros_like(v)
    return t, v, row


@triton.jit
def _elementwise_scan_kernel(
    A_ptr, b_ptr, z_ptr, carry_ptr, L, N, chunk,
    REVERSE: tl.constexpr, HAS_A: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    # z_n = t_n * z_{n-1} + v_n over the steps of this chunk; z_{-1} = 0, or the previous chunk's carry.
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    c = tl.program_id(1)
    if HAS_CARRY:
        prev = tl.maximum(c - 1, 0).to(tl.int64) * N
        z = tl.load(carry_ptr + prev + offs, mask=mask & (offs * 0 + c > 0), other=0.0).to(ACC)
    else:
        z = tl.zeros([BLOCK_N], dtype=ACC)
    start = c * chunk
    stop = tl.minimum(start + chunk, L)
    for n in tl.range(start, stop):
        t, v, row = _load_step(A_ptr, b_ptr, n, L, N, offs, mask, REVERSE, HAS_A, ACC)
        z = t * z + v
        tl.store(z_ptr + row + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elementwise_chunk_summary_kernel(
    A_ptr, b_ptr, P_ptr, s_ptr, L, N, chunk,
    REVERSE: tl.constexpr, HAS_A: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    # Compose the chunk's maps: s <- t_n s + v_n, p <- t_n p from s = 0, p = 1; P, s: (n_chunks, N).
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    c = tl.program_id(1)
    s = tl.zeros([BLOCK_N], dtype=ACC)
    p = tl.zeros([BLOCK_N], dtype=ACC) + 1.0
    start = c * chunk
    stop = tl.minimum(start + chunk, L)
    for n in tl.range(start, stop):
        t, v, _ = _load_step(A_ptr, b_ptr, n, L, N, offs, mask, REVERSE, HAS_A, ACC)
        s = t * s + v
        p = t * p
    row = c.to(tl.int64) * N
    tl.store(s_ptr + row + offs, s, mask=mask)
    tl.store(P_ptr + row + offs, p, mask=mask)

# ---------------------------------------------------------------------------------------------- launcher


def elementwise_scan(A: torch.Tensor | None, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    """Launch the elementwise scan: ``A`` ``(L, ...)`` or None (identity), ``b`` ``(L, ...)``; returns ``z``
    ``(L, N)``."""
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
