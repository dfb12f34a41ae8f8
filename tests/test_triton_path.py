"""The chain op with the Triton kernels (kernels="triton"): interpreted on CPU (TRITON_INTERPRET=1), compiled
on CUDA. Values and gradients must match eager as on the PyTorch path."""

import os

import pytest
import torch
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, run_both

from pcr_compile.models import DeepMLP, ResidualMLP

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's CPU interpreter (TRITON_INTERPRET=1)")

TRITON = {**PARALLEL, "kernels": "triton"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreted kernels


def test_linear_pointwise_chain_fused_newton_and_triton_adjoint():
    model = DeepMLP(layers=6, width=3, activation="tanh", gain=0.9).to(DEVICE)
    x = torch.randn(2, 3, device=DEVICE)
    y0, g0, y1, g1, solves = run_both(model, [x], {**TRITON, "min_chain_length": 4})
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    fwd, bwd = solves
    assert fwd.reason == "fused" and fwd.converged  # the fused Newton kernels ran
    assert bwd.converged and not bwd.fell_back


def test_general_block_with_triton_linear_recurrence():
    model = ResidualMLP(blocks=5, width=3, in_features=2, out_features=2).to(DEVICE)
    x = torch.randn(2, 2, device=DEVICE)
    y0, g0, y1, g1, solves = run_both(model, [x], {**TRITON, "min_chain_length": 4})
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert all(s.converged and not s.fell_back for s in solves)
