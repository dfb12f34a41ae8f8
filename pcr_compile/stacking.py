"""`StackedLayers`: a stack of identical modules held as one module with stacked parameters.

A `ModuleList` / `nn.Sequential` of L identical layers reaches the chain op as 2L (or more) separate
parameters, and the rewritten graph stacks them on every call (one `torch.stack` per parameter group, its
cost growing with L; README "Cost per call"). `StackedLayers(layers)` holds each parameter and buffer of the
layers once, stacked `(L, *shape)`, and runs layer i as `torch.func.functional_call(template, {name:
stacked[i]}, x)`. Under `torch.compile(..., backend="deeppcr")` the chain is found as `kind="layers"` over the
stacked tensors themselves: no stack per call, one `(L, ...)` gradient per parameter, no per-layer graph
inputs for Dynamo to guard. In eager mode it computes what the layers did, in order.

`scan=True`: under torch.compile the layers run as one `torch._higher_order_ops.scan` over the stacked rows,
so Dynamo traces one layer instead of L and the first call no longer grows with the depth. deeppcr unrolls
the scan in its own copy of the graph, where it finds the chain (`passes/scan.py`), and hands Inductor the
unrolled graph when it rewrites nothing. Other backends get the scan itself, and on torch 2.13 Inductor
fails to compile some scans (`DataDependentOutputException`, "scan might be aliasing"), so the default is
the plain loop, which every backend compiles.

    blocks = StackedLayers(model.blocks)          # model.blocks: an nn.ModuleList of identical blocks
    model.blocks = blocks                          # forward: x = blocks(x) instead of a loop over the list
    ...
    for layer, original in zip(blocks.unstack(), originals): ...   # per-layer modules again

The layers must have the same class, the same parameter and buffer names, shapes, dtypes and
`requires_grad`; a layer's forward takes the carried tensor first (extra arguments, the same for every
layer, pass through `forward(x, *args, **kwargs)`). The template is a copy of the first layer on the `meta`
device: it holds the structure (its hyper-parameters and submodules), never the values, so a layer whose
forward reads a tensor attribute that is neither a parameter nor a buffer is rejected.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

try:  # a higher-order op since torch 2.6 or so; without it the compiled forward is the plain loop
    from torch._higher_order_ops.scan import scan as _scan
except ImportError:  # pragma: no cover - older torch
    _scan = None


def _key(name: str) -> str:
    return name.replace(".", "__")


class StackedLayers(nn.Module):
    """L identical layers as one module whose parameters and buffers are stacked `(L, *shape)`; see the
    module docstring."""

    def __init__(self, layers: Iterable[nn.Module], *, scan: bool = False):
        super().__init__()
        if not isinstance(scan, bool):
            raise TypeError(f"StackedLayers: scan must be a bool, got {type(scan).__name__}")
        self.scan = scan
        layers = list(layers)
        if not layers:
            raise ValueError("StackedLayers: layers is empty")
        first = layers[0]
        if not all(isinstance(m, nn.Module) for m in layers):
            raise TypeError("StackedLayers: every layer must be an nn.Module, got "
                            f"{sorted({type(m).__name__ for m in layers if not isinstance(m, nn.Module)})}")
        kinds = {type(m) for m in layers}
        if len(kinds) > 1:
            raise ValueError(f"StackedLayers: layers must have one class, got {sorted(k.__name__ for k in kinds)}")
        self.parameter_names = [n for n, _ in first.named_parameters()]
        self.buffer_names = [n for n, _ in first.named_buffers()]
        for i, m in enumerate(layers[1:], 1):
            for what, a, b in (("parameter", dict(first.named_parameters()), dict(m.named_parameters())),
                               ("buffer", dict(first.named_buffers()), dict(m.named_buffers()))):
                if list(a) != list(b):
                    raise ValueError(f"StackedLayers: layer {i} has {what}s {list(b)}, layer 0 {list(a)}")
                for n in a:
                    x, y = a[n], b[n]
                    if (x is None) != (y is None) or (x is not None and (
                            x.shape != y.shape or x.dtype != y.dtype or x.device != y.device
                            or x.requires_grad != y.requires_grad)):
                        raise ValueError(f"StackedLayers: {what} {n!r} of layer {i} differs from layer 0's "
                                         "(shape, dtype, device or requires_grad)")
        for n in self.parameter_names:
            p0 = first.get_parameter(n)
            data = torch.stack([m.get_parameter(n).detach() for m in layers])
            self.register_parameter(_key(n), nn.Parameter(data, requires_grad=p0.requires_grad))
        for n in self.buffer_names:
            b0 = first.get_buffer(n)
            if b0 is None:
                raise ValueError(f"StackedLayers: buffer {n!r} is None")
            self.register_buffer(_key(n), torch.stack([m.get_buffer(n) for m in layers]))
        template = copy.deepcopy(first).to("meta")
        loose = [f"{prefix}{'.' if prefix else ''}{n}" for prefix, mod in template.named_modules()
                 for n, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        if loose:
            raise ValueError(f"StackedLayers: the layers hold tensor attributes {loose} that are neither "
                             "parameters nor buffers; they cannot be stacked")
        # Held outside the module tree: its (meta) parameters are structure only, never state.
        object.__setattr__(self, "_template", template)
        self.length = len(layers)

    def _state(self, i: int) -> dict[str, torch.Tensor]:
        state = {n: getattr(self, _key(n))[i] for n in self.parameter_names}
        state.update({n: getattr(self, _key(n))[i] for n in self.buffer_names})
        return state

    def forward(self, x, *args, **kwargs):
        if self.scan and _scan is not None and torch.compiler.is_compiling():
            # One step traced, not L: Dynamo's first call does not grow with L (passes/scan.py unrolls it
            # for the chain finder; a graph without a rewritten chain reaches Inductor with the scan).
            names = [*self.parameter_names, *self.buffer_names]

            def step(carry, rows):
                return functional_call(self._template, dict(zip(names, rows)), (carry, *args), kwargs,
                                       strict=True), ()

            final, _ = _scan(step, x, [getattr(self, _key(n)) for n in names])
            return final
        for i in range(self.length):
            x = functional_call(self._template, self._state(i), (x, *args), kwargs, strict=True)
        return x

    def unstack(self) -> list[nn.Module]:
        """The layers as separate modules again (copies holding the current values)."""
        out = []
        for i in range(self.length):
            m = copy.deepcopy(self._template).to_empty(device=getattr(self, _key(self.parameter_names[0])).device
                                                      if self.parameter_names else "cpu")
            with torch.no_grad():
                for n in self.parameter_names:
                    m.get_parameter(n).copy_(getattr(self, _key(n))[i])
                    m.get_parameter(n).requires_grad_(getattr(self, _key(n)).requires_grad)
                for n in self.buffer_names:
                    m.get_buffer(n).copy_(getattr(self, _key(n))[i])
            out.append(m)
        return out

    def extra_repr(self) -> str:
        return f"{self.length} x {type(self._template).__name__}"
