"""Benchmark workloads: one setup function per model, and the grids of parameters each suite sweeps.

A `Case` is a model name, its parameters and its setup function. The harness calls `case.build(device)`
once per case and hands the resulting `Workload` (callable, inputs, trainable tensors) to every provider,
so that eager, Inductor and deeppcr see the same weights and the same inputs.

Grids. The full grid follows DeepPCR (Danieli et al., NeurIPS 2023, arXiv 2309.16318): MLPs of 2^4..2^12
layers, widths 4..64, batch 1..128; residual MLPs and conv ResNets of 64..1024 blocks; diffusion sampler
loops of 25..1000 steps. It is meant for a GPU: Inductor alone spends minutes compiling a model unrolled
into thousands of layers. The `--quick` grid keeps every model small (at most 64 layers, 8 blocks,
25 sampler steps; the UNet sampler with eager and deeppcr-parallel only) so that a run, compile times
included, fits in about ten minutes on two CPU cores: Inductor alone takes about 25 s to compile a 25-step
MLP sampler loop there, and over 4 minutes for a 25-step UNet loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import torch

from pcr_compile.models import ConvResNet, DDIMSampler, DeepMLP, MLPDenoiser, ResidualMLP


class SkipCase(Exception):
    """Raised by a setup function that cannot run here (a missing optional dependency): a skipped row."""


@dataclass
class Workload:
    """What every provider runs: `fn(*inputs)`; `params` are the tensors a training step differentiates.

    `params` empty: the workload is measured forward only (samplers).
    """

    fn: Callable[..., Any]
    inputs: tuple[torch.Tensor, ...]
    params: list[torch.Tensor] = field(default_factory=list)
    note: str = ""

    @property
    def trainable(self) -> bool:
        return bool(self.params)


@dataclass(frozen=True)
class Case:
    """One model at one point of a grid. `only`: the provider labels that run it (empty: all), `why` says why."""

    model: str
    params: tuple[tuple[str, Any], ...]
    setup: Callable[..., Workload]
    only: tuple[str, ...] = ()
    why: str = ""

    @property
    def parameters(self) -> str:
        """The CSV's `parameters` cell, e.g. "layers=64,width=8,batch=16"."""
        return ",".join(f"{k}={v}" for k, v in self.params)

    def build(self, device: torch.device) -> Workload:
        return self.setup(device=device, **dict(self.params))


def _randn(shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    return torch.randn(shape, generator=g).to(device)


# ---------------------------------------------------------------------------------------------- setups


def setup_deep_mlp(device: torch.device, layers: int, width: int, batch: int, seed: int = 0) -> Workload:
    """DeepMLP (Linear + tanh) x layers, default init (contractive): DeepPCR's MLP experiment."""
    torch.manual_seed(seed)
    model = DeepMLP(layers=layers, width=width).to(device)
    return Workload(model, (_randn((batch, width), device, seed + 1),), list(model.parameters()))


def setup_residual_mlp(device: torch.device, blocks: int, width: int, batch: int, seed: int = 0) -> Workload:
    """Pre-norm residual MLP blocks (x + W2 gelu(W1 LN(x))), residual branch scaled by 1/sqrt(blocks)."""
    torch.manual_seed(seed)
    model = ResidualMLP(blocks=blocks, width=width).to(device)
    return Workload(model, (_randn((batch, width), device, seed + 1),), list(model.parameters()))


def setup_conv_resnet(device: torch.device, blocks: int, channels: int, image: int, batch: int,
                      seed: int = 0) -> Workload:
    """Pre-activation conv ResNet (GroupNorm, SiLU, 3x3 conv), residual branch scaled by 1/sqrt(blocks)."""
    torch.manual_seed(seed)
    model = ConvResNet(blocks=blocks, channels=channels).to(device)
    x = _randn((batch, 3, image, image), device, seed + 1)
    return Workload(model, (x,), list(model.parameters()))


def setup_ddim_mlp(device: torch.device, steps: int, batch: int, hidden: int = 64, seed: int = 0) -> Workload:
    """Deterministic DDIM sampling of 2-D points with an (untrained) MLP denoiser; forward only."""
    torch.manual_seed(seed)
    sampler = DDIMSampler(MLPDenoiser(dim=2, hidden=hidden), steps=steps).to(device)
    return Workload(sampler, (_randn((batch, 2), device, seed + 1),))


def setup_unet_ddim(device: torch.device, steps: int, batch: int, size: int, seed: int = 0) -> Workload:
    """DDIM sampling with a small diffusers UNet2DModel, through `pcr_compile.diffusion.sampling_loop`."""
    try:
        from pcr_compile.diffusion import sampling_loop
    except ImportError as e:
        raise SkipCase(f"pcr_compile.diffusion.sampling_loop is not importable: {e}") from e
    try:
        from diffusers import DDIMScheduler, UNet2DModel
    except ImportError as e:
        raise SkipCase(f"diffusers is not installed: {e}") from e
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).to(device).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    loop = sampling_loop(unet, DDIMScheduler(num_train_timesteps=1000), steps)
    sigma = float(getattr(loop, "init_noise_sigma", 1.0))
    x = _randn((batch, 3, size, size), device, seed + 1) * sigma
    return Workload(loop, (x,), note="UNet2DModel(block_out_channels=(16, 32), layers_per_block=1)")


SETUPS: dict[str, Callable[..., Workload]] = {
    "deep_mlp": setup_deep_mlp,
    "residual_mlp": setup_residual_mlp,
    "conv_resnet": setup_conv_resnet,
    "ddim_mlp": setup_ddim_mlp,
    "unet_ddim": setup_unet_ddim,
}

# ---------------------------------------------------------------------------------------------- grids


def _grid(model: str, only: tuple[str, ...] = (), why: str = "", **axes: Iterable[Any]) -> list[Case]:
    names = list(axes)
    return [Case(model, tuple(zip(names, values, strict=True)), SETUPS[model], only, why)
            for values in product(*axes.values())]


def _pow2(lo: int, hi: int) -> list[int]:
    return [2**k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


def mlp_cases(quick: bool) -> list[Case]:
    if quick:
        return _grid("deep_mlp", layers=[16, 64], width=[4, 16], batch=[8])
    return _grid("deep_mlp", layers=_pow2(16, 4096), width=[4, 8, 16, 32, 64], batch=[1, 16, 128])


def resnet_cases(quick: bool) -> list[Case]:
    if quick:
        return (_grid("residual_mlp", blocks=[8], width=[16], batch=[16])
                + _grid("conv_resnet", blocks=[8], channels=[8], image=[8], batch=[4]))
    return (_grid("residual_mlp", blocks=_pow2(64, 1024), width=[16, 64], batch=[32])
            + _grid("conv_resnet", blocks=_pow2(64, 1024), channels=[16], image=[16], batch=[8]))


QUICK_UNET_WHY = ("quick grid: Inductor spends minutes compiling the unrolled UNet loop on 2 CPU cores "
                  "(over 240 s at 25 steps); the full grid runs every provider")


def diffusion_cases(quick: bool) -> list[Case]:
    if quick:
        return (_grid("ddim_mlp", steps=[10, 25], batch=[64])
                + _grid("unet_ddim", only=("eager", "deeppcr-parallel"), why=QUICK_UNET_WHY,
                        steps=[8], batch=[1], size=[8]))
    steps = [25, 50, 100, 250, 500, 1000]
    return _grid("ddim_mlp", steps=steps, batch=[256]) + _grid("unet_ddim", steps=steps, batch=[4], size=[16])


def smoke_cases(quick: bool) -> list[Case]:
    """A single tiny MLP: the harness's own tests and a first look at a new machine."""
    return _grid("deep_mlp", layers=[8], width=[4], batch=[2])


SUITES: dict[str, Callable[[bool], list[Case]]] = {
    "mlp": mlp_cases,
    "resnet": resnet_cases,
    "diffusion": diffusion_cases,
    "smoke": smoke_cases,
}


def cases_for(suite: str, quick: bool) -> list[Case]:
    """The cases of one suite, or of mlp + resnet + diffusion for "all"."""
    if suite == "all":
        return [c for name in ("mlp", "resnet", "diffusion") for c in SUITES[name](quick)]
    try:
        return SUITES[suite](quick)
    except KeyError:
        raise ValueError(f"suite must be one of {sorted(SUITES) + ['all']}, got {suite!r}") from None
