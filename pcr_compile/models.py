"""Example models with long chains of repeated computation.

Used by the demo, the inspection CLI's built-in targets, the tests and the benchmark harness, so that
every one of them measures the same thing. Nothing here knows about the backend: these are ordinary
eager PyTorch models, written the way users write them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


class DeepMLP(nn.Module):
    """`layers` x (Linear(width, width) + activation), as in DeepPCR's MLP experiments.

    `gain` scales the default initialisation: below about 1 the chain is contractive (Newton converges
    in a few iterations), well above it the chain is expansive.
    """

    def __init__(self, layers: int = 64, width: int = 8, activation: str = "tanh", gain: float = 1.0):
        super().__init__()
        mods = []
        for _ in range(layers):
            lin = nn.Linear(width, width)
            with torch.no_grad():
                lin.weight.mul_(gain)
            mods += [lin, _activation(activation)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class StackedMLP(nn.Module):
    """`DeepMLP` with its parameters held stacked, `weight` `(layers, width, width)` and `bias` `(layers, width)`,
    read as `weight[i]` in the loop (the form scan-style code uses): the same initialisation as `DeepMLP`'s
    `nn.Linear` layers, and a chain op that takes the stacked tensors as they are."""

    def __init__(self, layers: int = 64, width: int = 8, activation: str = "tanh", gain: float = 1.0):
        super().__init__()
        ref = DeepMLP(layers, width, activation, gain)
        lins = ref.layers[0::2]
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in lins]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in lins]))
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.weight.shape[0]):
            x = self.act(torch.nn.functional.linear(x, self.weight[i], self.bias[i]))
        return x


class PreNormResidualBlock(nn.Module):
    """`x + W2 act(W1 LayerNorm(x))`: the pre-norm residual MLP block of transformers and MLP-Mixers."""

    def __init__(self, width: int, hidden: int | None = None, activation: str = "gelu", scale: float = 1.0):
        super().__init__()
        hidden = hidden or 2 * width
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(hidden, width)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Linear stem, `blocks` pre-norm residual blocks, LayerNorm and a linear head."""

    def __init__(self, blocks: int = 64, width: int = 16, in_features: int | None = None, out_features: int = 4,
                 activation: str = "gelu", scale: float | None = None):
        super().__init__()
        in_features = in_features or width
        scale = scale if scale is not None else 1.0 / math.sqrt(blocks)
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList([PreNormResidualBlock(width, activation=activation, scale=scale)
                                     for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ConvResidualBlock(nn.Module):
    """`x + multiplier * conv(act(norm(x)))`, a pre-activation ResNet block (GroupNorm: batch-independent).

    `scale` multiplies the conv's initial weights and bias; `multiplier` multiplies the branch output in
    every forward pass (a constant, not a parameter).
    """

    def __init__(self, channels: int, groups: int = 4, scale: float = 1.0, multiplier: float = 1.0):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.multiplier = float(multiplier)
        with torch.no_grad():
            self.conv.weight.mul_(scale)
            self.conv.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv(F.silu(self.norm(x)))
        # no multiply node for 1.0: graphs (and benchmark figures) of the default model stay as they were
        return x + (branch if self.multiplier == 1.0 else self.multiplier * branch)


class ConvResNet(nn.Module):
    """Conv stem, `blocks` residual blocks, global average pooling and a linear classifier.

    Each residual branch is scaled by `scale` (default `1/sqrt(blocks)`), either at initialisation
    (`depth_scaling="init"`: the conv weights are multiplied once) or in every forward pass
    (`depth_scaling="forward"`: the Depth-muP parametrisation of Yang et al. 2023). Both give the same
    network at initialisation. They differ in training: with "init" every block's SGD update has the same
    size whatever the depth, so the change of the output grows with the number of blocks and deep nets
    need a learning rate that shrinks with depth; with "forward" the gradients reaching each block shrink
    by `scale` too, so the output's change per step does not grow with depth (measured: 1024 blocks train
    stably at lr=0.3, where "init" is chaotic at lr=0.005; benchmarks/RESULTS.md).
    """

    def __init__(self, blocks: int = 16, channels: int = 8, in_channels: int = 3, num_classes: int = 10,
                 scale: float | None = None, depth_scaling: str = "init"):
        super().__init__()
        if depth_scaling not in ("init", "forward"):
            raise ValueError(f"depth_scaling must be 'init' or 'forward', got {depth_scaling!r}")
        scale = scale if scale is not None else 1.0 / math.sqrt(blocks)
        init, mult = (scale, 1.0) if depth_scaling == "init" else (1.0, scale)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvResidualBlock(channels, scale=init, multiplier=mult)
                                      for _ in range(blocks)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class MLPDenoiser(nn.Module):
    """Noise-prediction MLP for low-dimensional data, conditioned on the timestep (sinusoidal embedding)."""

    def __init__(self, dim: int = 2, hidden: int = 64, emb: int = 16, cond_dim: int = 0):
        super().__init__()
        self.emb = emb
        self.net = nn.Sequential(nn.Linear(dim + emb + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        half = self.emb // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=x.dtype) * (-math.log(10000.0) / half))
        ang = t.to(x.dtype).reshape(-1, 1) * freqs
        e = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).expand(x.shape[0], -1)
        h = [x, e] if cond is None else [x, e, cond]
        return self.net(torch.cat(h, dim=-1))


def ddim_alphas_cumprod(train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear beta schedule of DDPM (Ho et al. 2020), as cumulative products of alphas (float64)."""
    betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class DDIMSampler(nn.Module):
    """Deterministic DDIM sampling (eta = 0) written as a plain loop over Python-int timesteps.

    Each step is `x <- c1(t) * x + c2(t) * eps(x, t)` with per-step Python-float coefficients, so
    Dynamo traces the whole loop into one graph of `steps` repeated denoiser calls. `guidance` > 0 turns
    on classifier-free guidance (two denoiser calls per step, with and without `cond`).
    """

    def __init__(self, denoiser: nn.Module, steps: int = 50, train_steps: int = 1000, guidance: float = 0.0):
        super().__init__()
        self.denoiser = denoiser
        self.guidance = guidance
        ac = ddim_alphas_cumprod(train_steps)
        ts = torch.linspace(train_steps - 1, 0, steps).round().long().tolist()
        self.timesteps = [int(t) for t in ts]
        self.coefs = []
        for i, t in enumerate(self.timesteps):
            a_t = float(ac[t])
            a_prev = float(ac[self.timesteps[i + 1]]) if i + 1 < steps else 1.0
            # x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t);  x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps
            c1 = math.sqrt(a_prev / a_t)
            c2 = math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a_t) / a_t)
            self.coefs.append((c1, c2))

    def eps(self, x: torch.Tensor, t: int, cond: torch.Tensor | None) -> torch.Tensor:
        tt = torch.full((1,), float(t), device=x.device, dtype=x.dtype)
        if cond is None:
            return self.denoiser(x, tt)
        if self.guidance:
            e_c = self.denoiser(x, tt, cond)
            e_u = self.denoiser(x, tt, torch.zeros_like(cond))
            return e_u + self.guidance * (e_c - e_u)
        return self.denoiser(x, tt, cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for t, (c1, c2) in zip(self.timesteps, self.coefs):
            x = c1 * x + c2 * self.eps(x, t, cond)
        return x
