"""Shared test set-up: Triton's CPU interpreter where there is no GPU, fresh Dynamo state per test."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined (at import of the kernel modules).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads_rel_err(model_grads, ref_grads) -> float:
    """Largest error over all parameters, relative to the largest reference gradient."""
    scale = max(float(g.abs().max()) for g in ref_grads)
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(model_grads, ref_grads)) / scale
