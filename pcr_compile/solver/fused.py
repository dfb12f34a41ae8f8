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
import os
from typing import NamedTuple

import torch

from pcr_compile.kernels import IMPLS, settings
from pcr_compile.kernels.activations import ACTIVATIONS, act_and_grad
from pcr_compile.kernels.reference import linear_recurrence_torch

from .residual import step_residuals, tiny

log = logging.getLogger(__name__)

__all__ = ["NewtonResult", "newton_linear_pointwise", "ACTIVATIONS"]

MAX_FUSED_W = settings.MAX_DENSE_W  # the fused kernels hold one W_l in registers


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


def _newton_torch(z0, W, bias, activation, residual, tol, max_iters):
    L, (B, w) = W.shape[0], z0.shape
    Z = z0.expand(L, B, w).clone()  # (L, B, w): initial guess z_l = z_0
    residuals: list[float] = []
    it, converged = 0, False
    for k in range(max_iters + 1):
        prev = torch.cat([z0[None], Z[:-1]])  # (L, B, w): z_{l-1} at the old guess
        y = torch.einsum("lij,lbj->lbi", W, prev)  # W_l z_{l-1}
        fa, d = act_and_grad(y if bias is None else y + bias[:, None], activation)
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
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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
    ct = settings.compute_dtype(z0.dtype)
    batch = z0.shape[:-1]
    z = z0.reshape(-1, w).to(ct).contiguous()  # (B, w)
    Wc = W.to(device=z.device, dtype=ct)
    bc = None if bias is None else bias.to(device=z.device, dtype=ct)
    use_triton = impl == "triton" or (impl == "auto" and z0.is_cuda)
    if use_triton and w > MAX_FUSED_W:
        log.debug("fused Newton: w=%d > %d, PyTorch path", w, MAX_FUSED_W)
        use_triton = False
    if use_triton and not (z0.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):  # as triton_pcr's check;
        # Triton's own error here was "0 active drivers ([])"
        raise RuntimeError(f"kernels='triton' needs CUDA tensors or TRITON_INTERPRET=1 (CPU interpreter); the chain's "
                           f"state is on {z0.device}")
    if use_triton:
        from pcr_compile.kernels.triton_newton import fused_newton_launch  # lazily: needs Triton

        Z, it, conv, res = fused_newton_launch(z, Wc, bc, activation, residual, tol, max_iters, tiny(ct))
    else:
        Z, it, conv, res = _newton_torch(z, Wc, bc, activation, residual, tol, max_iters)
    traj = Z.reshape(L, *batch, w).to(z0.dtype)
    return NewtonResult(traj, it, res[-1], conv, res)
