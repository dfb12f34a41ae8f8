"""A model file for the CLI tests (`pcr-compile inspect tests/cli_target_model.py:make`).

Two stacks of 9 identical layers (not a power of two) separated by an explicit graph break, so the
inspection shows two graphs, one graph break with its reason, and one chain per graph. `make_with_kwargs`
returns keyword inputs too, which change the graph. The other callables are the ways a TARGET can be wrong.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LAYERS = 9
WIDTH = 6
BATCH = 3


class TwoStacks(nn.Module):
    def __init__(self, layers: int = LAYERS, width: int = WIDTH):
        super().__init__()
        self.first = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])
        self.second = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.first:
            x = torch.tanh(lin(x))
        torch._dynamo.graph_break()
        for lin in self.second:
            x = torch.sin(lin(x))
        return x


def make():
    torch.manual_seed(0)
    return TwoStacks(), (torch.randn(BATCH, WIDTH),)


class Masked(nn.Module):
    """A stack whose graph depends on its keyword inputs: `mask` adds a multiply per layer, `collect` returns
    every layer's output (values of earlier steps read after the chain)."""

    def __init__(self, layers: int = LAYERS, width: int = WIDTH):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x, mask=None, collect=True):
        outs = []
        for lin in self.lins:
            x = torch.tanh(lin(x))
            if mask is not None:
                x = x * mask
            outs.append(x)
        return (x, torch.stack(outs)) if collect else x


def make_with_kwargs():
    torch.manual_seed(0)
    return Masked(), (torch.randn(BATCH, WIDTH),), {"mask": (torch.rand(BATCH, WIDTH) > 0.2).float(), "collect": False}


def not_a_pair():
    return TwoStacks()


def bad_inputs():
    return TwoStacks(), ("not a tensor",)


def bad_kwargs():
    return TwoStacks(), (torch.randn(BATCH, WIDTH),), ["not", "a dict"]


def raises():
    raise RuntimeError("no weights here")


not_callable = 42
