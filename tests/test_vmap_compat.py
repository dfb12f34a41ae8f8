"""passes/vmap_compat.py: compositions of ops that vmap cannot batch, equal to the ops they stand in for."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcr_compile.passes.vmap_compat import SUBSTITUTES, group_norm, substitute


@pytest.mark.parametrize("bias", [True, False])
def test_recurrent_cell_compositions_equal_the_kernels_and_batch_under_vmap(bias):
    from pcr_compile.passes.vmap_compat import gru_cell, lstm_cell

    torch.manual_seed(0)
    lstm = nn.LSTMCell(4, 6, bias=bias).double()
    gru = nn.GRUCell(4, 6, bias=bias).double()
    x, h, c = (torch.randn(5, 3, n, dtype=torch.float64) for n in (4, 6, 6))  # 5 steps of a batch of 3
    lw = (lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh)
    gw = (gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
    for i in range(5):
        for a, b in zip(lstm_cell(x[i], (h[i], c[i]), *lw), torch.lstm_cell(x[i], (h[i], c[i]), *lw)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gru_cell(x[i], h[i], *gw), torch.gru_cell(x[i], h[i], *gw), rtol=1e-12, atol=1e-12)
    hb, cb = torch.vmap(lambda x, h, c: lstm_cell(x, (h, c), *lw))(x, h, c)
    torch.testing.assert_close(hb[2], lstm_cell(x[2], (h[2], c[2]), *lw)[0])
    torch.testing.assert_close(torch.vmap(lambda x, h: gru_cell(x, h, *gw))(x, h)[4], gru_cell(x[4], h[4], *gw))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_cell_compositions_equal_the_kernels_and_batch_under_vmap_without_a_fallback(nonlinearity, bias):
    """`nn.RNNCell`'s kernels have no batching rule: vmap ran them in a loop over the steps (a performance
    warning), so an RNNCell over a sequence was not evaluated in parallel."""
    import warnings

    from pcr_compile.passes.vmap_compat import rnn_relu_cell, rnn_tanh_cell

    torch.manual_seed(0)
    rnn = nn.RNNCell(4, 6, bias=bias, nonlinearity=nonlinearity).double()
    kernel, mine = ((torch.rnn_tanh_cell, rnn_tanh_cell) if nonlinearity == "tanh"
                    else (torch.rnn_relu_cell, rnn_relu_cell))
    assert SUBSTITUTES[kernel] is mine
    x, h = (torch.randn(5, 3, n, dtype=torch.float64) for n in (4, 6))
    w = (rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh)
    for i in range(5):
        torch.testing.assert_close(mine(x[i], h[i], *w), rnn(x[i], h[i]), rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched fallback's performance warning
        got = torch.vmap(lambda x, h: mine(x, h, *w))(x, h)
    torch.testing.assert_close(got[3], kernel(x[3], h[3], *w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_equals_torch_and_batches_non_contiguous_inputs_under_vmap(affine):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 4, 4, dtype=torch.float64)  # 3 steps of (N=2, C=8, 4x4)
    w, b = (torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)) if affine else (None, None)
    for i in range(3):
        torch.testing.assert_close(group_norm(x[i], 4, w, b), F.group_norm(x[i], 4, w, b), rtol=1e-12, atol=1e-12)
    xt = x.transpose(-1, -2)  # non-contiguous, as diffusers' attention blocks hand it on
    got = torch.vmap(lambda t: group_norm(t, 4, w, b))(xt)
    torch.testing.assert_close(got[1], F.group_norm(xt[1].contiguous(), 4, w, b), rtol=1e-12, atol=1e-12)


def test_substitute_points_only_the_listed_ops_to_their_stand_ins():
    class M(nn.Module):
        def forward(self, x):
            return torch.tanh(F.group_norm(x, 2))

    gm = torch.fx.symbolic_trace(M())
    assert substitute(gm.graph) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert group_norm in targets and torch.tanh in targets and F.group_norm not in targets
    assert substitute(gm.graph) == 0  # idempotent: the stand-ins are not in SUBSTITUTES
    assert all(v not in SUBSTITUTES for v in SUBSTITUTES.values())
