"""Triton kernels of the fused Newton solve for chains ``z_l = act(W_l z_{l-1} + bias_l)`` (+ ``z_{l-1}``).

One Newton iteration is three launches (four when the chain is cut into chunks), none of which syncs with
the host:

1. ``_newton_eval_kernel`` (grid: batch x chunks): every layer at the old guess ``Z^k`` -- pre-activation
   ``a_l = W_l z^k_{l-1} + bias_l``, ``f_l``, ``d_l = act'(a_l)``, the step residual of its row
   ``rho_{l,b} = max_i |z^k_{l,b,i} - f_{l,b,i}| / max(max_i |f_{l,b,i}|, tiny)`` (NaN as inf; ``residual.py``)
   and its max over the program's steps, the Newton offset ``beff_l = f_l - J_l z^k_{l-1}`` with
   ``J_l = diag(d_l) W_l`` (``+ I`` for the residual form); with chunks, ``_newton_summary_kernel``
   (grid: batch x chunks - 1) composes each chunk's map ``(P_c, s_c)`` of those steps (a separate kernel,
   so neither holds ``W_l``, ``J_l`` and ``P_c`` at once: no register spills at ``w = 64``);
2. ``_newton_carry_kernel`` (grid: batch): reduces ``rho = max_{l,b} rho_{l,b}`` over the programs, writes it
   to the status buffer's history, sets the on-device ``done`` flag when ``rho <= tol`` (or ``rho = inf``),
   else scans the chunk maps into carries;
3. ``_newton_update_kernel`` (grid: batch x chunks): the linear recurrence
   ``z_l = J_l z_{l-1} + beff_l`` from each chunk's carry (``z_0`` for the first), written over ``Z``.

After ``done`` is set every kernel is a no-op, so the host reads the status buffer
``(done, stopping evaluation, rho_0, rho_1, ...)`` only every few iterations, in one transfer.
``W_l`` stays in registers for the whole layer (``w <= 64``, padded to a power of two); ``P_c <- J_l P_c`` is
a ``tl.dot`` (``tf32x3`` for float32: three TF32 tensor-core products, about float32's accuracy). The launcher,
:func:`fused_newton_launch`, follows the kernels; the iteration it belongs to is ``solver/fused.py``.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from . import settings
from .activations import ACTIVATION_ID

# Compile-time activation codes, by name (``activations.py`` is the one table).
_IDENTITY = tl.constexpr(ACTIVATION_ID["identity"])
_TANH = tl.constexpr(ACTIVATION_ID["tanh"])
_RELU = tl.constexpr(ACTIVATION_ID["relu"])
_GELU = tl.constexpr(ACTIVATION_ID["gelu"])
_SIGMOID = tl.constexpr(ACTIVATION_ID["sigmoid"])
_SILU = tl.constexpr(ACTIVATION_ID["silu"])
CHECK_EVERY = 4  # iterations launched between two host reads of the status buffer

log = logging.getLogger(__name__)


@triton.jit
def _act(a, ACT: tl.constexpr):
    """(act(a), act'(a)) for ACT = ACTIVATION_ID[name]; gelu is the exact erf form (nn.GELU())."""
    if ACT == _IDENTITY:
        f = a
        d = tl.full(a.shape, 1.0, a.dtype)
    elif ACT == _TANH:
        # tanh(|a|) = (1 - e) / (1 + e), e = exp(-2|a|): no overflow, but 1 - e cancels for small |a|, so
        # |a| < 1/8 takes the odd Taylor series to a^13 (relative error under 4e-16 there).
        x = tl.abs(a)
        e = tl.exp(-2.0 * x)
        t = (1.0 - e) / (1.0 + e)
        x2 = x * x
        p = -1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)
        p = 62.0 / 2835.0 + x2 * p
        p = -17.0 / 315.0 + x2 * p
        p = 2.0 / 15.0 + x2 * p
        p = -1.0 / 3.0 + x2 * p
        t = tl.where(x < 0.125, x + x * x2 * p, t)
        f = tl.where(a < 0, -t, t)
        d = 1.0 - f * f
    elif ACT == _RELU:
        f = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (as torch.relu)
        d = (a > 0).to(a.dtype)
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        f = a * cdf
        d = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    elif ACT == _SIGMOID:
        f = 1.0 / (1.0 + tl.exp(-a))
        d = f * (1.0 - f)
    else:  # _SILU
        s = 1.0 / (1.0 + tl.exp(-a))
        f = a * s
        d = s * (1.0 + a * (1.0 - s))
    return f, d


@triton.jit
def _nan_to_inf(x):
    return tl.where(x != x, float("inf"), x)


@triton.jit
def _i64(x):
    # int64 offsets; also for the interpreter, whose loop indices are Python ints ([1] broadcasts as a scalar)
    return x + tl.zeros([1], dtype=tl.int64)


@triton.jit
def _block(w, W_PAD: tl.constexpr):
    """Row and column offsets of a padded ``W_PAD x W_PAD`` block, the row mask and the block mask for ``w``."""
    offs_r = tl.arange(0, W_PAD)
    offs_c = tl.arange(0, W_PAD)
    mask_r = offs_r < w
    return offs_r, offs_c, mask_r, mask_r[:, None] & (offs_c[None, :] < w)


@triton.jit
def _newton_eval_kernel(
    z0_ptr, W_ptr, bias_ptr, Z_ptr, D_ptr, BE_ptr, stats_ptr, status_ptr, L, B, w, chunk, n_chunks,
    TINY: tl.constexpr, ACT: tl.constexpr, RESID: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_PAD: tl.constexpr, ACC: tl.constexpr,
):
    # a_l = W_l z_{l-1} + bias_l; f_l = act(a_l) [+ z_{l-1}]; d_l = act'(a_l); beff_l = act(a_l) - d_l * (W_l z_{l-1});
    # rho_{l,b} = max_i |z_l - f_l| / max(max_i |f_l|, tiny), maxed over the chunk's steps (NaN counts as inf).
    # The steps are independent: the chunk only sets how many a program evaluates.
    bi = tl.program_id(0)
    c = tl.program_id(1)
    if tl.load(status_ptr) == 0:
        offs_r, offs_c, mask_r, mask2 = _block(w, W_PAD)
        mask_c = offs_c < w
        z0 = tl.load(z0_ptr + bi * w + offs_c, mask=mask_c, other=0.0).to(ACC)
        rho = tl.zeros([1], dtype=ACC)
        start = c * chunk
        stop = tl.minimum(start + chunk, L)
        for j in tl.range(start, stop):
            row = (_i64(j) * B + bi) * w
            prev = tl.load(Z_ptr + row - B * w + offs_c, mask=mask_c & (offs_c * 0 + j > 0), other=0.0)
            prev = tl.where((offs_c * 0 + j) > 0, prev.to(ACC), z0)
            Wl = tl.load(W_ptr + _i64(j) * w * w + offs_r[:, None] * w + offs_c[None, :], mask=mask2, other=0.0)
            y = tl.sum(Wl.to(ACC) * prev[None, :], axis=1)  # W_l z_{l-1}, rows layout
            a = y
            if HAS_BIAS:
                a = y + tl.load(bias_ptr + _i64(j) * w + offs_r, mask=mask_r, other=0.0).to(ACC)
            fa, d = _act(a, ACT)
            f = fa
            if RESID:
                f = fa + prev
            zl = tl.load(Z_ptr + row + offs_r, mask=mask_r, other=0.0).to(ACC)
            rmax = tl.max(tl.where(mask_r, _nan_to_inf(tl.abs(zl - f)), 0.0), axis=0)
            fmax = tl.max(tl.where(mask_r, _nan_to_inf(tl.abs(f)), 0.0), axis=0)
            rho = tl.maximum(rho, _nan_to_inf(rmax / tl.maximum(fmax, TINY)))
            tl.store(D_ptr + row + offs_r, d, mask=mask_r)
            tl.store(BE_ptr + row + offs_r, fa - d * y, mask=mask_r)
        tl.store(stats_ptr + bi * n_chunks + c + tl.arange(0, 1), rho)


@triton.jit
def _newton_summary_kernel(
    z0_ptr, W_ptr, D_ptr, BE_ptr, P_ptr, S_ptr, status_ptr, L, B, w, chunk,
    RESID: tl.constexpr, W_PAD: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    # Chunk c's composed map of the Newton steps z_l = J_l z_{l-1} + beff_l, J_l = diag(d_l) W_l [+ I]:
    # s <- J_l s + beff_l, P <- J_l P, from (z_0, 0) for the first chunk and (0, I) otherwise (grid: B x chunks-1).
    bi = tl.program_id(0)
    c = tl.program_id(1)
    if tl.load(status_ptr) == 0:
        offs_r, offs_c, mask_r, mask2 = _block(w, W_PAD)
        eye = tl.where(offs_r[:, None] == offs_c[None, :], 1.0, 0.0).to(ACC)
        first = (offs_r * 0 + c) == 0
        s = tl.load(z0_ptr + bi * w + offs_r, mask=mask_r & first, other=0.0).to(ACC)
        P = tl.where((offs_r[:, None] * 0 + c) == 0, 0.0, eye)
        start = c * chunk
        stop = tl.minimum(start + chunk, L)
        for j in tl.range(start, stop):
            row = (_i64(j) * B + bi) * w
            Wl = tl.load(W_ptr + _i64(j) * w * w + offs_r[:, None] * w + offs_c[None, :], mask=mask2, other=0.0)
            d = tl.load(D_ptr + row + offs_r, mask=mask_r, other=0.0)
            J = d[:, None] * Wl.to(ACC)
            if RESID:
                J = J + eye
            s = tl.sum(J * s[None, :], axis=1) + tl.load(BE_ptr + row + offs_r, mask=mask_r, other=0.0)
            if USE_DOT:
                P = tl.dot(J, P, input_precision=PREC, out_dtype=ACC)
            else:
                P = tl.sum(J[:, :, None] * P[None, :, :], axis=1)
        base = c.to(tl.int64) * B + bi
        tl.store(S_ptr + base * w + offs_r, s, mask=mask_r)
        tl.store(P_ptr + base * w * w + offs_r[:, None] * w + offs_c[None, :], P, mask=mask2)


@triton.jit(do_not_specialize=["k"])  # the iteration counter: one compiled variant for every k
def _newton_carry_kernel(
    P_ptr, S_ptr, carry_ptr, stats_ptr, status_ptr, k, n_stats, tol, B, w, n_sum,
    W_PAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # rho = max over programs of their rho; status[2 + k] = rho; stop <=> rho <= tol or rho = inf;
    # else carry[c] = P[c] carry[c-1] + S[c] over the chunk maps (P[0] = 0: the first chunk starts at z_0).
    # Every program that finds done unset computes the same rho and writes the same values (benign race).
    bi = tl.program_id(0)
    if tl.load(status_ptr) == 0:
        offs = tl.arange(0, BLOCK)
        rm = tl.zeros([BLOCK], dtype=ACC)
        for j in tl.range(0, n_stats, BLOCK):
            rm = tl.maximum(rm, tl.load(stats_ptr + j + offs, mask=offs + j < n_stats, other=0.0))
        rho = tl.max(rm, axis=0)
        tl.store(status_ptr + 2 + k, rho)
        if (rho <= tol) | (rho == float("inf")):
            tl.store(status_ptr + 1, k.to(ACC))
            tl.store(status_ptr, 1.0)  # every program agrees; the others may skip as soon as they see it
        else:
            offs_r, offs_c, mask_r, mask2 = _block(w, W_PAD)
            z = tl.zeros([W_PAD], dtype=ACC)
            for n in tl.range(0, n_sum):
                base = _i64(n) * B + bi
                offs_T = base * w * w + offs_r[:, None] * w + offs_c[None, :]
                T = tl.load(P_ptr + offs_T, mask=mask2 & (n > 0), other=0.0)
                z = tl.sum(T * z[None, :], axis=1) + tl.load(S_ptr + base * w + offs_r, mask=mask_r, other=0.0)
                tl.store(carry_ptr + base * w + offs_r, z, mask=mask_r)


@triton.jit
def _newton_update_kernel(
    z0_ptr, W_ptr, D_ptr, BE_ptr, carry_ptr, Z_ptr, status_ptr, L, B, w, chunk,
    RESID: tl.constexpr, W_PAD: tl.constexpr, ACC: tl.constexpr,
):
    # z_l = d_l * (W_l z_{l-1}) [+ z_{l-1}] + beff_l over this chunk, from z_0 (chunk 0) or carry[c-1].
    bi = tl.program_id(0)
    c = tl.program_id(1)
    if tl.load(status_ptr) == 0:
        offs_r, offs_c, mask_r, mask2 = _block(w, W_PAD)
        first = (offs_r * 0 + c) == 0
        z0 = tl.load(z0_ptr + bi * w + offs_r, mask=mask_r & first, other=0.0).to(ACC)
        prev = tl.maximum(c - 1, 0).to(tl.int64) * B + bi
        cin = tl.load(carry_ptr + prev * w + offs_r, mask=mask_r & (offs_r * 0 + c > 0), other=0.0).to(ACC)
        z = tl.where(first, z0, cin)
        start = c * chunk
        stop = tl.minimum(start + chunk, L)
        for j in tl.range(start, stop):
            row = (_i64(j) * B + bi) * w
            Wl = tl.load(W_ptr + _i64(j) * w * w + offs_r[:, None] * w + offs_c[None, :], mask=mask2, other=0.0)
            d = tl.load(D_ptr + row + offs_r, mask=mask_r, other=0.0)
            be = tl.load(BE_ptr + row + offs_r, mask=mask_r, other=0.0)
            zn = d * tl.sum(Wl.to(ACC) * z[None, :], axis=1) + be
            if RESID:
                zn = zn + z
            z = zn
            tl.store(Z_ptr + row + offs_r, z, mask=mask_r)


# ------------------------------------------------------------------------------------------------ launcher


def fused_newton_launch(z0, W, bias, activation: str, residual: bool, tol: float, max_iters: int, tiny: float,
                        chunk=None, check_every=CHECK_EVERY):
    """Newton on ``z_l = act(W_l z_{l-1} + bias_l)`` (``+ z_{l-1}``) with the kernels above: ``z0`` ``(B, w)``, ``W``
    ``(L, w, w)``, ``bias`` ``(L, w)`` or None, all contiguous in the compute dtype; ``tiny``: the residual's floor
    (``solver/residual.py``). Returns ``(Z, iterations, converged, residuals)``."""

    L, (B, w) = W.shape[0], z0.shape
    dev, ct = z0.device, z0.dtype
    W = W.contiguous()
    W_PAD = settings.w_pad(w)
    warps = settings.dense_warps(W_PAD)
    chunk = settings.plan_chunk(B, L, w, ct, settings.device_props(dev), chunk)
    n_chunks = triton.cdiv(L, chunk)
    Z = z0.expand(L, B, w).contiguous()  # (L, B, w) in the compute dtype, updated in place
    D, BE = torch.empty_like(Z), torch.empty_like(Z)  # act'(a_l) and the Newton offsets
    n_sum = max(n_chunks - 1, 1)
    P = torch.empty(n_sum, B, w, w, dtype=ct, device=dev)
    S, carry = torch.empty(n_sum, B, w, dtype=ct, device=dev), torch.empty(n_sum, B, w, dtype=ct, device=dev)
    n_stats = B * n_chunks
    stats = torch.zeros(n_stats, dtype=ct, device=dev)  # per program: max over its steps of rho_{l,b}
    # status = (stopped, evaluation it stopped at, rho at evaluation 0, 1, ..): read by the host in one transfer
    status = torch.zeros(max_iters + 3, dtype=ct, device=dev)
    acc = settings.acc_dtype(ct)
    act = ACTIVATION_ID[activation]
    block, carry_warps = settings.reduce_settings(n_stats, W_PAD)
    bias_arg = W if bias is None else bias.contiguous()
    meta = dict(W_PAD=W_PAD, ACC=acc, num_warps=warps)
    k_read, reads, host = -1, 0, None
    for k in range(max_iters + 1):
        settings.launch(
            _newton_eval_kernel, (B, n_chunks), z0, W, bias_arg, Z, D, BE, stats, status, L, B, w, chunk, n_chunks,
            device=dev, TINY=tiny, ACT=act, RESID=residual, HAS_BIAS=bias is not None, **meta,
        )
        if n_chunks > 1:
            settings.launch(
                _newton_summary_kernel, (B, n_chunks - 1), z0, W, D, BE, P, S, status, L, B, w, chunk, device=dev,
                RESID=residual, USE_DOT=settings.use_dot(W_PAD), PREC=settings.dot_precision(ct), **meta,
            )
        settings.launch(
            _newton_carry_kernel, (B,), P, S, carry, stats, status, k, n_stats, float(tol), B, w, n_chunks - 1,
            device=dev, W_PAD=W_PAD, ACC=acc, BLOCK=block, num_warps=carry_warps,
        )
        if k < max_iters:
            settings.launch(
                _newton_update_kernel, (B, n_chunks), z0, W, D, BE, carry, Z, status, L, B, w, chunk, device=dev,
                RESID=residual, **meta,
            )
        if (k + 1) % check_every == 0 or k == max_iters:  # always true at the last k: host is set below
            k_read, reads = k, reads + 1
            host = settings.to_host(status)  # the one device-to-host transfer of this check
            if host[0]:
                break
    stopped = bool(host[0])
    it = int(host[1]) if stopped else max_iters
    residuals = [float(r) for r in host[2 : it + 3]]
    converged = stopped and residuals[-1] != math.inf  # the device stops on convergence or a non-finite residual
    log.debug("fused Newton (triton): %d iterations, %d host reads (last at %d), chunks %d",
                 it, reads, k_read, n_chunks)
    return Z, it, converged, residuals
