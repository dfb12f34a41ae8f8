"""vmap-friendly replacements for ops whose kernels `torch.func.vmap` cannot batch.

The chain op evaluates all steps of a template at once under `vmap`; a few ATen kernels query memory
formats that vmap does not support (`group_norm` on a non-contiguous input fails with "NYI: querying
is_contiguous inside of vmap for memory_format other than torch.contiguous_format", as in diffusers'
UNet attention blocks), and the recurrent cells have no batching rule at all (`lstm_cell` fails;
`gru_cell`, `rnn_tanh_cell` and `rnn_relu_cell` fall back to a loop over the batch). Templates call these
compositions instead: the same math in plain tensor ops, equal to the kernels up to rounding. The sequential
fallback runs the same template, so both paths agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """`F.group_norm` as reductions over (N, G, C/G * spatial)."""
    n, c = x.shape[0], x.shape[1]
    xs = x.reshape(n, num_groups, -1)
    mean = xs.mean(-1, keepdim=True)
    var = xs.var(-1, unbiased=False, keepdim=True)
    y = ((xs - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def lstm_cell(x: torch.Tensor, hx, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None = None,
              b_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.lstm_cell` (the kernel of `nn.LSTMCell`): gates i, f, g, o; returns (h', c')."""
    h, c = hx
    gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


def gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.gru_cell` (the kernel of `nn.GRUCell`): gates r, z and candidate n; returns h'."""
    gi, gh = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    ir, iz, in_ = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return n + z * (h - n)


def rnn_tanh_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.rnn_tanh_cell` (the kernel of `nn.RNNCell`, nonlinearity="tanh"): tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh).
    """
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))


def rnn_relu_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.rnn_relu_cell` (`nn.RNNCell`, nonlinearity="relu")."""
    return torch.relu(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))


SUBSTITUTES = {F.group_norm: group_norm, torch.group_norm: group_norm, torch.lstm_cell: lstm_cell,
               torch.gru_cell: gru_cell, torch.rnn_tanh_cell: rnn_tanh_cell, torch.rnn_relu_cell: rnn_relu_cell}


def substitute(graph: torch.fx.Graph) -> int:
    """Point the graph's calls of ops in SUBSTITUTES to their replacements; returns how many changed."""
    changed = 0
    for n in graph.nodes:
        if n.op == "call_function" and n.target in SUBSTITUTES:
            n.target = SUBSTITUTES[n.target]
            changed += 1
    return changed
