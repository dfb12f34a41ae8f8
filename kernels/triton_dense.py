"""Triton chunked scan for the dense linear recurrence ``z[l] = A[l] z[l-1] + b[l]`` (and its adjoint).

Each program owns one batch element and one chunk of the chain; the ``w x w`` block (``w <= 64``, padded to
a power of two with masks) and the running state stay in registers, so ``A`` and ``b`` are read from global
memory once per pass and no block product round-trips through memory. One chunk (the whole chain) is a
plain sequential scan: O(L) work, one read of ``A`` and ``b``, one write of ``z``. When the batch is too
small to fill the GPU the chain is cut into chunks scanned in parallel (two-level scan, as in
accelerated-scan and Mamba's chunked scan):

1. ``_dense_chunk_summary_kernel``: per chunk, the composed affine map ``x -> P_c x + s_c`` of its steps;
2. ``_dense_scan_kernel`` over the chunk summaries: the carry (state at each chunk's end);
3. ``_dense_scan_kernel`` again over the chain, every chunk starting from its carry.

The chunked variant reads ``A`` twice and spends ``w^3`` flops per step on ``P_c`` (a ``tl.dot`` for
``w >= 16``: ``tf32x3`` tensor-core products in float32, which keep ``w = 64`` free of register spills); it
pays when the sequential scan would leave most of the GPU idle or walk a long chain.

Steps are numbered in solve order ``n = 0..L-1``: position ``l = n`` forward and ``l = L-1-n`` for the
adjoint, whose coefficient ``A[l+1]^T = A[L-n]^T`` is read transposed by index arithmetic (no flip,
no transpose materialised). References: Blelloch (1990) prefix sums; DeepPCR (arXiv 2309.16318).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings

# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_step(A_ptr, b_ptr, n, L, bi, B, w, offs_r, offs_c, REVERSE: tl.constexpr, ACC: tl.constexpr):
    """Coefficient block T (rows r, cols c) and offset vector of solve step n, in the accumulation dtype.

    forward:  T = A[n],            v = b[n]
    adjoint:  T = A[L-n]^T,        v = b[L-1-n]
    Step 0 has no predecessor: its block is masked to zero (A[0] and A[L] are never read).
    """
    if REVERSE:
        pos = L - 1 - n
        aidx = L - n
        elem = offs_c[None, :] * w + offs_r[:, None]  # transposed read
    else:
        pos = n
        aidx = n
        elem = offs_r[:, None] * w + offs_c[None, :]
    mask_r = offs_r < w
    mask2 = mask_r[:, None] & (offs_c[None, :] < w) & (n > 0)
    a_base = (aidx.to(tl.int64) * B + bi) * w * w
    T = tl.load(A_ptr + a_base + elem, mask=mask2, other=0.0).to(ACC)
    b_base = (pos.to(tl.int64) * B + bi) * w
    v = tl.load(b_ptr + b_base + offs_r, mask=mask_r, other=0.0).to(ACC)
    return T, v, b_base


@triton.jit
def _matvec(T, z):
    # y[r] = sum_c T[r, c] z[c]: a register matvec (broadcast-multiply + reduction, no tensor cores).
    return tl.sum(T * z[None, :], axis=1)


@triton.jit
def _dense_scan_kernel(
    A_ptr, b_ptr, z_ptr, carry_ptr, L, B, w, chunk,
    REVERSE: tl.constexpr, HAS_CARRY: tl.constexpr, W_PAD: tl.constexpr, ACC: tl.constexpr,
):
    # z_n = T_n z_{n-1} + v_n over the steps n of this chunk; z_{-1} = 0, or the carry of the previous chunk.
    bi = tl.program_id(0)
    c = tl.program_id(1)
    offs_r = tl.arange(0, W_PAD)
    offs_c = tl.arange(0, W_PAD)
    if HAS_CARRY:  # chunk c > 0 starts from the state at the end of chunk c - 1
        prev = tl.maximum(c - 1, 0).to(tl.int64) * B + bi
        z = tl.load(carry_ptr + prev * w + offs_r, mask=(offs_r < w) & (offs_r * 0 + c > 0), other=0.0).to(ACC)
    else:
        z = tl.zeros([W_PAD], dtype=ACC)
    start = c * chunk
    stop = tl.minimum(start + chunk, L)
    for n in tl.range(start, stop):
        T, v, b_base = _load_step(A_ptr, b_ptr, n, L, bi, B, w, offs_r, offs_c, REVERSE, ACC)
        z = _matvec(T, z) + v
        tl.store(z_ptr + b_base + offs_r, z.to(z_ptr.dtype.element_ty), mask=offs_r < w)


@triton.jit
def _dense_chunk_summary_kernel(
    A_ptr, b_ptr, P_ptr, s_ptr, L, B, w, chunk,
    REVERSE: tl.constexpr, W_PAD: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    # Compose the chunk's maps: s <- T_n s + v_n, P <- T_n P from s = 0, P = I; P, s: (n_chunks, B, w[, w]).
    bi = tl.program_id(0)
    c = tl.program_id(1)
    offs_r = tl.arange(0, W_PAD)
    offs_c = tl.arange(0, W_PAD)
    s = tl.zeros([W_PAD], dtype=ACC)
    P = tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0).to(ACC)
    start = c * chunk
    stop = tl.minimum(start + chunk, L)
    for n in tl.range(start, stop):
        T, v, _ = _load_step(A_ptr, b_ptr, n, L, bi, B, w, offs_r, offs_c, REVERSE, ACC)
        s = _matvec(T, s) + v
        if USE_DOT:
            P = tl.dot(T, P, input_precision=PREC, out_dtype=ACC)
        else:
            P = tl.sum(T[:, :, None] * P[None, :, :], axis=1)
    base = c.to(tl.int64) * B + bi
    mask_r = offs_r < w
    tl.store(s_ptr + base * w + offs_r, s, mask=mask_r)
    mask2 = mask_r[:, None] & (offs_c[None, :] < w)
    tl.store(P_ptr + base * w * w + offs_r[:, None] * w + offs_c[None, :], P, mask=mask2)

# ---------------------------------------------------------------------------------------------- launcher


def dense_scan(A: torch.Tensor, b: torch.Tensor, reverse: bool, chunk: int | None) -> torch.Tensor:
    """Launch the dense scan (one chunk, or the two-level scan): ``A`` ``(L, *batch, w, w)``, ``b`` ``(L, *batch, w)``;
    returns ``z`` ``(L, B, w)``."""
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
