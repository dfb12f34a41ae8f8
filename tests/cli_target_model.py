"""A model file for the CLI tests (`pcr-compile inspect tests/cli_target_model.py:make`).

Two stacks of 9 identical layers (not a power of two) separated by an explicit graph break, so the
inspection shows two graphs, one graph break with its reason, and one chain per graph. The other callables
are the ways a TARGET can be wrong.
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


def not_a_pair():
    return TwoStacks()


def bad_inputs():
    return TwoStacks(), ("not a tensor",)


def raises():
    raise RuntimeError("no weights here")


not_callable = 42
