"""The activations the fused Newton solve knows, by name: the one table (``passes/structure.py`` recognises them in a
graph, ``solver/fused.py`` runs their PyTorch form, ``triton_newton.py`` their Triton form, selected by name)."""

from __future__ import annotations

import torch

ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "sigmoid", "silu")
# The Triton kernels' compile-time activation code: derived from the names, so no copy can be reordered.
ACTIVATION_ID = {name: i for i, name in enumerate(ACTIVATIONS)}


def act_and_grad(a: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
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
