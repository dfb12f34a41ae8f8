"""Pure-PyTorch reference of the linear recurrences solved by the PCR kernels.

The solver reduces every Newton step (and the adjoint of the backward pass) to a first-order linear
recurrence along the chain dimension (dim 0, length L):

    forward  (reverse=False):  z[l] = A[l] z[l-1] + b[l],     l = 0..L-1,  z[-1] = 0  (A[0] unused)
    adjoint  (reverse=True):   z[l] = A[l+1]^T z[l+1] + b[l], l = L-1..0,  z[L] = 0

`A[l]` is a `(w, w)` matrix ("dense"), a length-w vector applied elementwise ("diagonal") or the
identity (`A is None`, a prefix sum). Both directions are solved here by Parallel Cyclic Reduction,
which for a bidiagonal system is a Hillis-Steele scan of affine maps: at level i, for every l >= 2^i,
`b[l] <- b[l] + A[l] b[l - 2^i]`, `A[l] <- A[l] A[l - 2^i]`; ceil(log2 L) levels, O(L log L) work.

This module imports without Triton and is the CPU path and the test oracle for the Triton kernels.
References: Hockney & Jesshope, "Parallel Computers 2" (1988), cyclic reduction; Danieli et al.,
DeepPCR, NeurIPS 2023 (arXiv 2309.16318); Blelloch, "Prefix sums and their applications" (1990).
"""

from __future__ import annotations

import torch

from .settings import compute_dtype

STRUCTURES = ("dense", "diagonal", "identity")


def _reverse_coefficients(A: torch.Tensor, structure: str) -> torch.Tensor:
    # The adjoint z[l] = A[l+1]^T z[l+1] + b[l] read backwards (m = L-1-l) is the forward recurrence
    # z'[m] = A'[m] z'[m-1] + b'[m] with A'[m] = A[L-m]^T for m >= 1 (A'[0] unused, set to zero).
    At = A.transpose(-1, -2) if structure == "dense" else A
    flipped = At.flip(0)[:-1]
    return torch.cat([torch.zeros_like(At[:1]), flipped], dim=0)


def pcr_forward_torch(A: torch.Tensor | None, b: torch.Tensor, structure: str) -> torch.Tensor:
    """Forward recurrence by PCR levels in PyTorch; inputs already validated and in compute dtype."""
    L = b.shape[0]
    b = b.clone()
    if structure == "identity":
        return b.cumsum(0)
    A = A.clone()
    A[0] = 0  # z[-1] = 0: the first map is constant.
    d = 1
    while d < L:
        if structure == "dense":
            # (L-d, *batch, w, w) @ (L-d, *batch, w, 1)
            b_new = b[d:] + (A[d:] @ b[:-d].unsqueeze(-1)).squeeze(-1)
            if 2 * d < L:
                A[d:] = A[d:] @ A[:-d].clone()
        else:
            b_new = b[d:] + A[d:] * b[:-d]
            if 2 * d < L:
                A[d:] = A[d:] * A[:-d].clone()
        b[d:] = b_new
        d *= 2
    return b


def linear_recurrence_torch(
    A: torch.Tensor | None, b: torch.Tensor, *, structure: str, reverse: bool = False
) -> torch.Tensor:
    """PyTorch implementation of :func:`pcr_compile.kernels.linear_recurrence` (no validation)."""
    out_dtype = b.dtype
    ct = compute_dtype(b.dtype)
    b = b.to(ct)
    A = None if A is None else A.to(ct)
    if reverse:
        if A is not None:
            A = _reverse_coefficients(A, structure)
        z = pcr_forward_torch(A, b.flip(0), structure).flip(0)
    else:
        z = pcr_forward_torch(A, b, structure)
    return z.to(out_dtype)


def linear_recurrence_sequential(
    A: torch.Tensor | None, b: torch.Tensor, *, structure: str, reverse: bool = False
) -> torch.Tensor:
    """Step-by-step evaluation of the same recurrence, in b's dtype: the oracle for tests."""
    L = b.shape[0]
    z = torch.empty_like(b)
    prev = torch.zeros_like(b[0])

    def apply(a: torch.Tensor | None, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        if structure == "identity":
            return v
        if structure == "diagonal":
            return a * v
        m = a.transpose(-1, -2) if transpose else a
        return (m @ v.unsqueeze(-1)).squeeze(-1)

    steps = range(L - 1, -1, -1) if reverse else range(L)
    for n, pos in enumerate(steps):
        if n == 0:
            z[pos] = b[pos]
        else:
            a = None if A is None else (A[pos + 1] if reverse else A[pos])
            z[pos] = apply(a, prev, transpose=reverse) + b[pos]
        prev = z[pos]
    return z
