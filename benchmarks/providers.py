"""Providers: the ways a workload is run (eager, Inductor, deeppcr), and the cached-output backend.

`Provider.build(fn)` returns the callable the harness measures; compiled providers compile lazily, on the
first call, which the harness times as the compile time. `cached_output_backend` is the floor any
torch.compile backend pays per call (Dynamo's guards and frame handling, nothing else): it runs the graph
once and then returns that stored output (`benchmarks/overhead.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Provider:
    """A way to run a workload. `build(fn)` returns the callable to measure (compiling lazily, on first call)."""

    name: str  # eager | inductor | deeppcr
    mode: str  # "-" for eager; "default" / "reduce-overhead" for inductor; "parallel" / "auto" for deeppcr
    build: Callable[[Callable[..., Any]], Callable[..., Any]]
    compiled: bool = True
    cuda_only: bool = False
    skip_note: str = ""
    # deeppcr: the same provider with kernels="triton", for counting launches on the Triton path on the CPU
    # under TRITON_INTERPRET=1 (`measuring.count_rows`); None for the others.
    triton_build: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None

    @property
    def label(self) -> str:
        return self.name if self.mode in ("-", "default") else f"{self.name}-{self.mode}"


def _eager(fn):
    return fn


def _inductor(fn):
    return torch.compile(fn)


def _inductor_cudagraphs(fn):
    compiled = torch.compile(fn, mode="reduce-overhead")

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous call may be overwritten now
        return compiled(*args)

    return call


def _deeppcr(mode: str, options: dict[str, Any]):
    def build(fn):
        # The backend is found by name through the `torch_dynamo_backends` entry point; if it is missing or
        # broken, torch.compile or the first call raises, and the harness records the error.
        return torch.compile(fn, backend="deeppcr", options={"mode": mode, **options})

    return build


def default_providers(deeppcr_options: dict[str, Any] | None = None) -> list[Provider]:
    opts = dict(deeppcr_options or {})
    return [
        Provider("eager", "-", _eager, compiled=False),
        Provider("inductor", "default", _inductor),
        Provider("inductor", "reduce-overhead", _inductor_cudagraphs, cuda_only=True,
                 skip_note="mode='reduce-overhead' records CUDA graphs: CUDA only"),
        Provider("deeppcr", "parallel", _deeppcr("parallel", opts),
                 triton_build=_deeppcr("parallel", {**opts, "kernels": "triton"})),
        Provider("deeppcr", "auto", _deeppcr("auto", opts),
                 triton_build=_deeppcr("auto", {**opts, "kernels": "triton"})),
    ]


def select_providers(providers: Sequence[Provider], labels: str | None) -> list[Provider]:
    """Keep the providers whose label is in the comma-separated `labels` (all of them when None)."""
    if not labels:
        return list(providers)
    wanted = [s.strip() for s in labels.split(",") if s.strip()]
    known = {p.label: p for p in providers}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {sorted(known)}")
    return [known[w] for w in wanted]



def triton_interpreted() -> bool:
    """Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1, read when the kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cached_output_backend(gm: torch.fx.GraphModule, example_inputs, fresh: bool = False) -> Callable[..., Any]:
    """A torch.compile backend that runs `gm` once and returns that stored output on every call: what is
    left of a compiled call is Dynamo's own cost (guards, frame evaluation, argument handling). `fresh`:
    return newly allocated outputs (`empty_like` of the stored ones) instead, as any backend that computes
    does (`fresh_output_backend`)."""
    stored: list[Any] = []

    def call(*args):
        if not stored:
            with torch.no_grad():
                stored.append(gm(*args))
        if fresh:
            return type(stored[0])(torch.empty_like(t) if isinstance(t, torch.Tensor) else t for t in stored[0])
        return stored[0]

    return call


def fresh_output_backend(gm: torch.fx.GraphModule, example_inputs) -> Callable[..., Any]:
    """`cached_output_backend` returning fresh outputs: the floor plus the cost of a new output."""
    return cached_output_backend(gm, example_inputs, fresh=True)
