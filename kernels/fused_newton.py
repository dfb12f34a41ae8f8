"""Fused Newton solve for chains of linear + pointwise layers: ``z_l = act(W_l z_{l-1} + bias_l)`` (+ ``z_{l-1}``).

The general solver (``newton.py``) evaluates arbitrary layers through callables; this module handles the
common narrow MLP block in closed form: the Jacobian is ``J_l = diag(act'(a_l)) W_l`` (``+ I`` in the
residual form), so a Newton iteration needs no autograd and, on the GPU, no host round trip.

Newton (DeepPCR, Danieli et al., NeurIPS 2023, arXiv 2309.16318): initial guess ``z_l = z_0`` for all l;
iteration k evaluates every layer at the old guess in one batched op, then solves the linear recurrence
``z_l = J_l z_{l-1} + (f_l(z^k_{l-1}) - J_l z^k_{l-1})`` from the given ``z_0``. It stops at the first
evaluation whose largest step residual ``max_l rho_l`` (``residual.py``: each step's max|r| against its own
max|f|, row by row) is ``<= tol`` (or is not finite, or after ``max_iters`` updates). Not converging is
reported, not handled: the caller finishes sequentially.

``impl="torch"``: batched PyTorch ops and the PyTorch PCR (``reference.py``). ``impl="triton"``: three
launches per iteration, four when the chain is cut into chunks (``triton_newton.py``; chunks planned by
``settings.plan_chunk`` at every width), convergence checked on the device; the host reads one small
buffer (the done flag, the stopping evaluation and the residual history) every ``CHECK_EVERY`` iterations,
so a 5-iteration solve costs two device-to-host reads. Both report the same iterations and residuals up
to rounding.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from .reference import compute_dtype, linear_recurrence_torch
from .residual import step_residuals, tiny

logger = logging.getLogger(__name__)

__all__ = ["NewtonResult", "newton_linear_pointwise", "ACTIVATIONS"]

ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "sigmoid", "silu")
CHECK_EVERY = 4  # Triton path: iterations launched between two host reads of the status buffer
MAX_FUSED_W = 64


class NewtonResult(NamedTuple):
    """Outcome of :func:`newton_linear_pointwise`.

    traj: ``(L, *batch, w)`` = ``[z_1 .. z_L]`` in ``z0``'s dtype; iterations: Newton updates done;
    residual: the last evaluation's largest step residual ``max_l rho_l``, ``rho_l = max_b max_i |r_{l,b,i}|
    / max(max_i |f_{l,b,i}|, tiny)`` (``residual.step_residuals``; inf when not finite); converged: residual
    ``<= tol``; residuals: that largest step residual at every evaluation (``iterations + 1`` entries).
    """

    traj: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    residuals: list[float]


# -------------------------------------------------------------------------------------------- PyTorch path


def _act_and_grad(a: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a), act'(a)) in closed form; gelu is the exact erf form (nn.GELU())."""
    if activation == "identity":
        return a, torch.ones_like(a)
    if activation == "tanh":
        t = torch.tanh(a)
        return t, 1 - t * t
    if activation == "relu":
        return torch.relu(a), (a > 0).to(a.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(a * 0.7071067811865476))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * 0.3989422804014327
    s = torch.sigmoid(a)
    if activation == "sigmoid":
        return s, s * (1 - s)
    return a * s, s * (1 + a * (1 - s))  # silu


def _newton_torch(z0, W, bias, activation, residual, tol, max_iters):
    L, (B, w) = W.shape[0], z0.shape
    Z = z0.expand(L, B, w).clone()  # (L, B, w): initial guess z_l = z_0
    residuals: list[float] = []
    it, converged = 0, False
    for k in range(max_iters + 1):
        prev = torch.cat([z0[None], Z[:-1]])  # (L, B, w): z_{l-1} at the old guess
        y = torch.einsum("lij,lbj->lbi", W, prev)  # W_l z_{l-1}
        fa, d = _act_and_grad(y if bias is None else y + bias[:, None], activation)
        f = fa + prev if residual else fa
        rho = float(step_residuals(Z - f, f).amax())  # max_l rho_l; NaN counts as inf, as on the device
        residuals.append(rho)
        it = k
        if rho <= tol:
            converged = True
            break
        if rho == math.inf or k == max_iters:
            break
        J = d[..., None] * W[:, None]  # (L, B, w, w) = diag(act'(a_l)) W_l
        if residual:
            J = J + torch.eye(w, dtype=J.dtype, device=J.device)
        beff = fa - d * y  # f_l - J_l z_{l-1}
        beff[0] += (J[0] @ z0[..., None])[..., 0]  # z_0 is given: fold J_1 z_0 into the first offset
        Z = linear_recurrence_torch(J, beff, structure="dense")
    return Z, it, converged, residuals


# --------------------------------------------------------------------------------------------- Triton path


def _newton_triton(z0, W, bias, activation, residual, tol, max_iters, chunk=None, check_every=CHECK_EVERY):
    import triton  # lazily: the PyTorch path imports without Triton

    from . import settings
    from .triton_newton import _newton_carry_kernel, _newton_eval_kernel, _newton_summary_kernel, _newton_update_kernel

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
    act = ACTIVATIONS.index(activation)
    block, carry_warps = settings.reduce_settings(n_stats, W_PAD)
    bias_arg = W if bias is None else bias.contiguous()
    meta = dict(W_PAD=W_PAD, ACC=acc, num_warps=warps)
    k_read, reads, host = -1, 0, None
    for k in range(max_iters + 1):
        settings.launch(
            _newton_eval_kernel, (B, n_chunks), z0, W, bias_arg, Z, D, BE, stats, status, L, B, w, chunk, n_chunks,
            device=dev, TINY=tiny(ct), ACT=act, RESID=residual, HAS_BIAS=bias is not None, **meta,
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
            host = status.tolist()  # the one device-to-host transfer of this check
            if host[0]:
                break
    stopped = bool(host[0])
    it = int(host[1]) if stopped else max_iters
    residuals = [float(r) for r in host[2 : it + 3]]
    converged = stopped and residuals[-1] != math.inf  # the device stops on convergence or a non-finite residual
    logger.debug("fused Newton (triton): %d iterations, %d host reads (last at %d), chunks %d",
                 it, reads, k_read, n_chunks)
    return Z, it, converged, residuals


# ------------------------------------------------------------------------------------------ public function


def newton_linear_pointwise(
    z0: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str,
    residual: bool = False,
    tol: float,
    max_iters: int,
    impl: str = "auto",
) -> NewtonResult:
    """Solve the chain ``z_l = act(W_l z_{l-1} + bias_l)`` (``residual``: ``z_{l-1} + act(...)``), l = 1..L.

    Shapes: ``z0`` ``(*batch, w)``; ``W`` ``(L, w, w)`` (``x @ W_l^T``, as ``nn.Linear.weight``); ``bias``
    ``(L, w)`` or ``None``. ``activation`` in :data:`ACTIVATIONS`. Iterates in float32 for half types and
    float64 for float64; returns :class:`NewtonResult` with ``traj`` ``(L, *batch, w)`` in ``z0``'s dtype.
    ``impl``: ``"triton"`` (CUDA, or the interpreter under ``TRITON_INTERPRET=1``; ``w <= 64``, wider falls
    back to the PyTorch path), ``"torch"``, or ``"auto"`` (Triton on CUDA tensors).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if not isinstance(z0, torch.Tensor) or z0.dim() < 1 or not z0.is_floating_point():
        raise ValueError("z0 must be a floating tensor of shape (*batch, w)")
    w = z0.shape[-1]
    if not isinstance(W, torch.Tensor) or W.dim() != 3 or W.shape[0] < 1 or tuple(W.shape[1:]) != (w, w):
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must have shape (L, w, w) with L >= 1 and w = {w} (z0's last dim), got {got}")
    L = W.shape[0]
    if bias is not None and tuple(bias.shape) != (L, w):
        raise ValueError(f"bias must have shape (L, w) = {(L, w)} or be None, got {tuple(bias.shape)}")
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    ct = compute_dtype(z0.dtype)
    batch = z0.shape[:-1]
    z = z0.reshape(-1, w).to(ct).contiguous()  # (B, w)
    Wc = W.to(device=z.device, dtype=ct)
    bc = None if bias is None else bias.to(device=z.device, dtype=ct)
    use_triton = impl == "triton" or (impl == "auto" and z0.is_cuda)
    if use_triton and w > MAX_FUSED_W:
        logger.debug("fused Newton: w=%d > %d, PyTorch path", w, MAX_FUSED_W)
        use_triton = False
    if use_triton:
        Z, it, conv, res = _newton_triton(z, Wc, bc, activation, residual, tol, max_iters)
    else:
        Z, it, conv, res = _newton_torch(z, Wc, bc, activation, residual, tol, max_iters)
    traj = Z.reshape(L, *batch, w).to(z0.dtype)
    return NewtonResult(traj, it, res[-1], conv, res)
