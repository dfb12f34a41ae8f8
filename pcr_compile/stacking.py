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
the plain loop, which every backend compiles. Layers with buffers in training mode run the plain loop even
with `scan=True`: a scan's body may not write its inputs, and such layers may (BatchNorm's running
statistics). So do calls with a Python float among the extra arguments: after the float changes between calls,
Dynamo's recompile reads it with `.item()` inside the body, and a scan refuses data-dependent reads.

    blocks = StackedLayers(model.blocks)          # model.blocks: an nn.ModuleList of identical blocks
    model.blocks = blocks                          # forward: x = blocks(x) instead of a loop over the list
    ...
    for layer, original in zip(blocks.unstack(), originals): ...   # per-layer modules again

The layers must have the same class, the same parameter and buffer names, shapes, dtypes and
`requires_grad`; a layer's forward takes the carried tensor first (extra arguments, the same for every
layer, pass through `forward(x, *args, **kwargs)`). The template is a copy of the first layer on the `meta`
device: it holds the structure (its hyper-parameters and submodules), never the values, so a layer whose
forward reads a tensor attribute that is neither a parameter nor a buffer is rejected, and so are layers with
hooks (forward, forward pre-, backward: the template would run layer 0's for every layer) and layers that share a
tensor (a tied weight would be stacked as separate rows).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

try:  # where this torch has no scan higher-order op, the compiled forward is the plain loop
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
        if isinstance(layers, (dict, nn.ModuleDict)):  # iterating one gives its keys
            raise TypeError(f"StackedLayers: layers is a {type(layers).__name__}, whose iteration gives its keys; "
                            "pass its modules in order: StackedLayers(list(layers.values()))")
        if isinstance(layers, torch.Tensor) or not isinstance(layers, Iterable):
            raise TypeError("StackedLayers: layers must be an nn.ModuleList, an nn.Sequential or another iterable of "
                            f"nn.Module, got {type(layers).__name__}")
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
        if len({m.training for m in layers}) > 1:
            raise ValueError("StackedLayers: layers mix training and eval mode; put them all in one")
        tensors = [(dict(m.named_parameters()), dict(m.named_buffers())) for m in layers]
        for i, own in enumerate(tensors[1:], 1):
            for what, a, b in zip(("parameter", "buffer"), tensors[0], own):
                if list(a) != list(b):
                    raise ValueError(f"StackedLayers: layer {i} has {what}s {list(b)}, layer 0 {list(a)}")
                for n, x in a.items():
                    y = b[n]
                    if (x.shape, x.dtype, x.device, x.requires_grad) != (y.shape, y.dtype, y.device, y.requires_grad):
                        raise ValueError(f"StackedLayers: {what} {n!r} of layer {i} differs from layer 0's "
                                         "(shape, dtype, device or requires_grad)")
        # One template runs every layer, on its own copies of the values: per-layer hooks would not run (the
        # first layer's would run for all), and a tensor two layers share would be stacked as two rows (its
        # gradients and updates no longer shared).
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        for i, m in enumerate(layers):
            for sub_name, sub in m.named_modules():
                kinds = [h[1:].replace("_", " ") for h in hooks if getattr(sub, h, None)]
                if kinds:
                    where = f"its submodule {sub_name!r}" if sub_name else "it"
                    raise ValueError(f"StackedLayers: layer {i} has {' and '.join(kinds)} (on {where}); one template "
                                     "module runs every layer, so per-layer hooks cannot run: remove them, or keep "
                                     "the layers separate")
        owner: dict[int, tuple[int, str]] = {}
        for i, (ps, bs) in enumerate(tensors):
            for n, t in (*ps.items(), *bs.items()):
                j, other = owner.setdefault(id(t), (i, n))
                if j != i:
                    raise ValueError(f"StackedLayers: layer {i}'s {n!r} is layer {j}'s {other!r} (one tensor, "
                                     "tied); stacking would untie it: keep tied layers separate")
        params, buffers = torch.func.stack_module_state(layers)  # (L, ...) each; new leaves, detached
        self.parameter_names, self.buffer_names = list(params), list(buffers)
        for n, t in params.items():
            self.register_parameter(_key(n), nn.Parameter(t, requires_grad=t.requires_grad))
        for n, t in buffers.items():
            self.register_buffer(_key(n), t)
        template = copy.deepcopy(first).to("meta")
        loose = [f"{prefix}{'.' if prefix else ''}{n}" for prefix, mod in template.named_modules()
                 for n, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        if loose:
            raise ValueError(f"StackedLayers: the layers hold tensor attributes {loose} that are neither "
                             "parameters nor buffers; they cannot be stacked")
        # Held outside the module tree: its (meta) parameters are structure only, never state.
        object.__setattr__(self, "_template", template)
        self.length = len(layers)
        self.train(first.training)  # the layers' mode (all one, checked above), here and in the template

    def train(self, mode: bool = True) -> StackedLayers:
        """`nn.Module.train` (and so `.eval()`), passed on to the template, which runs every layer: it is held
        outside the module tree, so `nn.Module.train` alone would leave its Dropout / BatchNorm in the mode the
        layers were stacked in."""
        super().train(mode)
        self._template.train(mode)
        return self

    def _stacked(self) -> dict[str, torch.Tensor]:
        """Every stacked parameter and buffer by the layer's own name."""
        return {n: getattr(self, _key(n)) for n in (*self.parameter_names, *self.buffer_names)}

    def forward(self, x, *args, **kwargs):
        stacked = self._stacked()

        def layer(carry, rows):
            return functional_call(self._template, dict(zip(stacked, rows)), (carry, *args), kwargs, strict=True)

        # A scan's body may not mutate its inputs (Dynamo refuses the whole scan, under every backend), and a
        # layer in training mode may write its buffers (BatchNorm's running statistics): those run the loop. So do
        # calls with a Python float among the extra arguments: when it changes between calls Dynamo recompiles with
        # the float unspecialised, read with `.item()` inside the body, which a scan refuses (data-dependent).
        floats = any(type(a) is float for a in torch.utils._pytree.tree_leaves((args, kwargs)))
        if self.scan and _scan is not None and torch.compiler.is_compiling() and not floats and not (
                self.training and self.buffer_names):
            # One step traced, not L (passes/scan.py unrolls it for the chain finder, and hands Inductor the
            # unrolled steps when no chain is rewritten).
            return _scan(lambda carry, rows: (layer(carry, rows), ()), x, list(stacked.values()))[0]
        for i in range(self.length):
            x = layer(x, [t[i] for t in stacked.values()])
        return x

    def unstack(self) -> list[nn.Module]:
        """The layers as separate modules again (copies holding the current values, in the stack's current
        dtypes and devices: after `.double()` or `.to(device)` on the stack, the layers are float64 / there)."""
        stacked = self._stacked()
        device = next(iter(stacked.values())).device if stacked else "cpu"
        out = []
        for i in range(self.length):
            m = copy.deepcopy(self._template).to_empty(device=device)
            for n, t in stacked.items():  # each tensor replaced, not copied into: the template keeps the dtypes
                prefix, _, leaf = n.rpartition(".")  # the layers had when stacked, the stack may have changed since
                owner, row = m.get_submodule(prefix), t[i].detach().clone()
                if n in self.parameter_names:
                    setattr(owner, leaf, nn.Parameter(row, requires_grad=t.requires_grad))
                else:
                    owner._buffers[leaf] = row  # in place in the dict: a non-persistent buffer stays one
            out.append(m)
        return out

    def extra_repr(self) -> str:
        return f"{self.length} x {type(self._template).__name__}"
