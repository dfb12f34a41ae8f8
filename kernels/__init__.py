"""Linear-recurrence kernels for the Newton-PCR solver: a PyTorch path everywhere, Triton on CUDA.

Device numerics only: the public :func:`linear_recurrence` (the math and the PyTorch references in
``reference.py``; the chunked-scan Triton kernels with their launchers in ``triton_dense.py`` and
``triton_elementwise.py``, dispatched by ``triton_pcr.py``), the fused Newton kernels with their launcher
(``triton_newton.py``), the activation table they select from by name (``activations.py``) and the launch
settings of every kernel (``settings.py``). The iterations that use them are ``pcr_compile.solver``'s.
"""

from __future__ import annotations

import torch

from .reference import STRUCTURES, linear_recurrence_sequential, linear_recurrence_torch

__all__ = ["linear_recurrence", "linear_recurrence_sequential", "STRUCTURES"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch")


def _check(A: torch.Tensor | None, b: torch.Tensor, structure: str, impl: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"b must be a tensor of shape (L, *batch, w), got {type(b).__name__}")
    if b.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"b must have a floating dtype in {_FLOAT_DTYPES}, got {b.dtype}")
    if b.dim() < 2 or b.shape[0] < 1 or b.shape[-1] < 1:
        raise ValueError(f"b must have shape (L, *batch, w) with L >= 1 and w >= 1, got {tuple(b.shape)}")
    L, w = b.shape[0], b.shape[-1]
    if structure == "identity":
        if A is not None:
            raise ValueError("A must be None for structure='identity'")
        return
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"A must be a tensor for structure={structure!r}, got {type(A).__name__}")
    expected = (*b.shape, w) if structure == "dense" else tuple(b.shape)
    if tuple(A.shape) != expected:
        name = "(L, *batch, w, w)" if structure == "dense" else "(L, *batch, w)"
        raise ValueError(
            f"A must have shape {name} = {expected} for structure={structure!r} and b of shape "
            f"{tuple(b.shape)}, got {tuple(A.shape)}"
        )
    if A.dtype != b.dtype:
        raise ValueError(f"A and b must have the same dtype, got A: {A.dtype}, b: {b.dtype}")
    if A.device != b.device:
        raise ValueError(f"A and b must be on the same device, got A: {A.device}, b: {b.device}")
    del L


def linear_recurrence(
    A: torch.Tensor | None, b: torch.Tensor, *, structure: str, reverse: bool = False, impl: str = "auto"
) -> torch.Tensor:
    """Solve a first-order linear recurrence along dim 0 in O(log L) parallel depth.

    ``reverse=False``: ``z[l] = A[l] z[l-1] + b[l]`` for l = 0..L-1 with ``z[-1] = 0`` (``A[0]`` unused).
    ``reverse=True`` (the adjoint): ``z[l] = A[l+1]^T z[l+1] + b[l]`` for l = L-1..0 with ``z[L] = 0``.

    Shapes: ``b`` is ``(L, *batch, w)``; ``A`` is ``(L, *batch, w, w)`` for ``structure="dense"``,
    ``(L, *batch, w)`` for ``"diagonal"`` (elementwise) and ``None`` for ``"identity"`` (a prefix sum).
    Returns ``z`` with ``b``'s shape and dtype; half types accumulate in float32.
    ``impl``: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA tensors, PyTorch otherwise).
    """
    _check(A, b, structure, impl)
    if impl == "triton" or (impl == "auto" and b.is_cuda):
        from . import triton_pcr  # imported lazily: the CPU path needs no Triton

        return triton_pcr.linear_recurrence_triton(A, b, structure=structure, reverse=reverse)
    return linear_recurrence_torch(A, b, structure=structure, reverse=reverse)
