"""vmap-friendly replacements for ops whose kernels `torch.func.vmap` cannot batch.

The chain op evaluates all steps of a template at once under `vmap`; a few ATen kernels query memory
formats that vmap does not support (`group_norm` on a non-contiguous input fails with "NYI: querying
is_contiguous inside of vmap for memory_format other than torch.contiguous_format", as in diffusers'
UNet attention blocks). Templates call these compositions instead: the same math in plain tensor ops,
equal to the kernels up to rounding. The sequential fallback runs the same template, so both paths agree.
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


SUBSTITUTES = {F.group_norm: group_norm, torch.group_norm: group_norm}


def substitute(graph: torch.fx.Graph) -> int:
    """Point the graph's calls of ops in SUBSTITUTES to their replacements; returns how many changed."""
    changed = 0
    for n in graph.nodes:
        if n.op == "call_function" and n.target in SUBSTITUTES:
            n.target = SUBSTITUTES[n.target]
            changed += 1
    return changed
