"""Counting kernel launches and host syncs of one call: what a launch-bound GPU would pay for.

    with count_launches() as c:
        fn(*inputs)
    c.launches, c.syncs, c.by_op           # totals and the per-op breakdown

Three sources, added up in `Counts.launches`:

- **aten ops** seen by a `TorchDispatchMode` (`CountingMode`, which sets `ignore_compile_internals`: without
  it Dynamo runs a compiled function eagerly while a mode is active): every op that reaches the dispatcher's Python
  key, after autograd and after CompositeImplicit decompositions (so `x @ w.T` counts as one `mm`, `reshape`
  as the view or the copy it became). An op counts as a launch unless it only makes a view or reads
  metadata: its schema's returns all alias an input without writing (`Tensor(a)`: view, transpose, expand,
  select, slice, detach, unbind, ...), or it is in `NO_LAUNCH` (allocations without a fill such as
  `empty_strided`, `_unsafe_view`, `lift_fresh`, `sym_size`, ...). In-place and `out=` ops write
  (`Tensor(a!)`) and count. Ops outside `aten`/`prims` (the chain ops `pcr_chain::*`, custom ops) are not
  launches themselves: their Python implementation (`torch.library.custom_op`'s function) is run with the
  mode re-entered, so that the ops it runs are counted (an op without one is noted as "opaque").
- **Inductor's generated kernels**: the wrapper code calls each generated kernel by a module-level name
  (`cpp_fused_*` on the CPU, `triton_*` objects' `.run` on CUDA); while counting, those names in every loaded
  Inductor module (`PyCodeCache.modules`) are replaced by counting wrappers. Extern kernels (`addmm`,
  `mm`, convolutions) are aten ops and are counted by the mode.
- **Triton launches** (`kernel[grid](...)`): `JITFunction.run` and, under `TRITON_INTERPRET=1`, the
  interpreter's `InterpretedFunction.run` are wrapped (the interpreter does not call Triton's launch hooks).
  The interpreter's own host copies inside a launch are not counted as aten ops. If `pcr_compile.kernels`
  exposes a launch counter of its own, it is not needed: this wrapper sees every launch of any kernel.

Host syncs: ops that make the host wait for device data: `_local_scalar_dense` (`item()`, `bool()`,
`float()`, `int()`, `if t:`; seen as `item` / `is_nonzero` inside the chain op), `equal`, ops whose output
size depends on the data (`nonzero`, `masked_select`, `unique*`, `repeat_interleave` without `output_size`;
these also launch), and copies to the CPU from another device (`_to_copy` / `copy_`).

**What a CPU run cannot see**: `.tolist()`, `.numpy()` and `.cpu()` of CPU tensors do not dispatch at all
(on CUDA `.tolist()` / `.cpu()` dispatch a `_to_copy` to the CPU and are counted); `torch.cuda.synchronize()`,
events and streams are not ops; nor are the launches or syncs of C++ code that calls CUDA directly. Counts
on the CPU are of the CPU code path: deeppcr's chain op takes its PyTorch kernels there unless
`kernels="triton"` is passed (under the interpreter), and CPU Inductor fuses differently from GPU Inductor
(its matmuls are extern `addmm` / `mm` calls on both).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that neither launch a kernel nor read device data, beyond the views found from their schemas.
NO_LAUNCH = frozenset({
    "empty.memory_format", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted",
    "resize_", "_unsafe_view", "lift_fresh", "sym_size.int", "sym_stride.int", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "set_.source_Storage",
    "set_.source_Storage_storage_offset", "_local_scalar_dense", "item", "is_nonzero", "equal",
})
# Ops that read device data on the host (a sync); the first set also launches kernels.
SYNC_AND_LAUNCH = frozenset({"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                             "unique_dim_consecutive", "repeat_interleave.Tensor", "nonzero_static"})
# `item` / `is_nonzero` reach the mode themselves where functorch's keys are re-included (inside the chain
# op); their `_local_scalar_dense` then runs below the mode, so each counts once.
SYNC_ONLY = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal"})


def _name(func) -> str:
    """`aten::add.Tensor` -> `add.Tensor`; overload "default" dropped (`aten::mm.default` -> `mm`)."""
    name = func._schema.name.split("::", 1)[-1]
    ov = func._overloadname
    return name if ov == "default" else f"{name}.{ov}"


def _packet_name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def _python_impl(func):
    """The Python function of a `torch.library.custom_op` (None for other ops)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
    except Exception:  # noqa: BLE001 -- private API: treat the op as opaque
        return None
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


def is_view(func) -> bool:
    """All returns alias an input and none writes: a view, no kernel."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


def is_copy_to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU device into CPU memory (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(cuda_tensor)`)."""
    name = _packet_name(func)
    if name == "_to_copy":
        dev = kwargs.get("device")
        src = _device_of(args[0]) if args else None
        return dev is not None and torch.device(dev).type == "cpu" and src is not None and src.type != "cpu"
    if name == "copy_" and len(args) >= 2:
        dst, src = _device_of(args[0]), _device_of(args[1])
        return dst is not None and src is not None and dst.type == "cpu" and src.type != "cpu"
    return False


@dataclass
class Counts:
    """What one or more calls launched and synced; `by_op` maps "aten:mm", "inductor:cpp_fused_tanh_0",
    "triton:kernel_name", "sync:_local_scalar_dense" to counts."""

    aten: int = 0
    inductor: int = 0
    triton: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> int:
        return self.aten + self.inductor + self.triton

    def summary(self, top: int = 6) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in self.by_op.most_common(top))
        return (f"aten {self.aten}, inductor kernels {self.inductor}, triton {self.triton}; syncs {self.syncs}"
                + (f"; top: {ops}" if ops else ""))


class CountingMode(TorchDispatchMode):
    """Counts aten launches and host syncs into `counts` (see the module docstring for the rules)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, Dynamo skips compiled frames while a mode is active and runs them eagerly; with it,
        # the mode is off while compiling and sees what the compiled artifact runs.
        return True

    def __init__(self, counts: Counts, quiet: threading.local):
        super().__init__()
        self.counts = counts
        self.quiet = quiet

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(self.quiet, "depth", 0):  # inside a Triton launch under the interpreter: its own copies
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prims"):
            impl = _python_impl(func)
            if impl is not None:
                with self:  # a custom op (a chain op): count what its Python implementation runs
                    return impl(*args, **kwargs)
            self.counts.by_op[f"opaque:{_name(func)}"] += 1  # its inner ops cannot be seen
            return func(*args, **kwargs)
        name, packet = _name(func), _packet_name(func)
        c = self.counts
        if name in SYNC_ONLY or packet in SYNC_ONLY or is_copy_to_host(func, args, kwargs):
            c.syncs += 1
            c.by_op[f"sync:{name}"] += 1
        if name in SYNC_AND_LAUNCH or packet in SYNC_AND_LAUNCH:
            c.syncs += 1
            c.by_op[f"sync:{name}"] += 1
        if not (is_view(func) or name in NO_LAUNCH or packet in NO_LAUNCH):
            c.aten += 1
            c.by_op[f"aten:{name}"] += 1
        return func(*args, **kwargs)


def _triton_run_classes() -> list[type]:
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except ImportError:
        return classes
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def _counting_triton(counts: Counts, quiet: threading.local) -> Iterator[None]:
    saved = []
    for cls in _triton_run_classes():
        real = cls.run

        def run(self, *args, _real=real, **kwargs):
            if not kwargs.get("warmup", False):
                counts.triton += 1
                counts.by_op[f"triton:{getattr(self, '__name__', type(self).__name__)}"] += 1
            quiet.depth = getattr(quiet, "depth", 0) + 1
            try:
                return _real(self, *args, **kwargs)
            finally:
                quiet.depth -= 1

        saved.append((cls, real))
        cls.run = run
    try:
        yield
    finally:
        for cls, real in saved:
            cls.run = real


class _CountingKernel:
    """Stands in for a generated kernel: `kernel(...)` (CPU) or `kernel.run(...)` (Triton) counts a launch."""

    def __init__(self, name: str, kernel, counts: Counts):
        self._name, self._kernel, self._counts = name, kernel, counts

    def _count(self):
        self._counts.inductor += 1
        self._counts.by_op[f"inductor:{self._name}"] += 1

    def __call__(self, *args, **kwargs):
        self._count()
        return self._kernel(*args, **kwargs)

    def run(self, *args, **kwargs):
        self._count()
        return self._kernel.run(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._kernel, item)


def _is_generated_kernel(name: str, value) -> bool:
    if name.startswith("cpp_fused") or name.startswith("cpp_"):
        return callable(value)
    return name.startswith("triton_") and hasattr(value, "run")


@contextlib.contextmanager
def _counting_inductor(counts: Counts) -> Iterator[None]:
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        yield
        return
    swapped = []
    for mod in list(PyCodeCache.modules) + list(getattr(PyCodeCache, "modules_no_attr", {}).values()):
        for name, value in list(vars(mod).items()):
            if not isinstance(value, _CountingKernel) and _is_generated_kernel(name, value):
                setattr(mod, name, _CountingKernel(name, value, counts))
                swapped.append((mod, name, value))
    try:
        yield
    finally:
        for mod, name, value in swapped:
            setattr(mod, name, value)


@contextlib.contextmanager
def count_launches() -> Iterator[Counts]:
    """Count launches and host syncs of everything run inside the block (see the module docstring)."""
    counts = Counts()
    quiet = threading.local()
    with _counting_inductor(counts), _counting_triton(counts, quiet), _counting_host_reads(counts, quiet), \
            CountingMode(counts, quiet):
        yield counts


@contextlib.contextmanager
def _counting_host_reads(counts: Counts, quiet) -> Iterator[None]:
    """Each read of the solver or a launcher (`kernels.settings.to_host`) is one host sync, on any device: on
    a CPU `.tolist()` dispatches nothing to see, on CUDA its copy is not counted a second time."""
    from pcr_compile.kernels import settings

    real = settings.to_host

    def counted(t):
        counts.syncs += 1
        counts.by_op["sync:to_host"] += 1
        quiet.depth = getattr(quiet, "depth", 0) + 1
        try:
            return real(t)
        finally:
            quiet.depth -= 1

    settings.to_host = counted
    try:
        yield
    finally:
        settings.to_host = real


def count_call(fn) -> Counts:
    """The counts of one call of `fn()` (already compiled: call it once before)."""
    with count_launches() as c:
        fn()
    return c


def main(argv=None) -> int:
    """`python -m benchmarks.counting`: launches and host syncs of a DeepMLP per forward and training step."""
    import argparse
    import os

    from .gpu_model import ASSUMPTIONS, estimate_ms

    ap = argparse.ArgumentParser(description="Launches and host syncs per forward and training step of a "
                                 "DeepMLP (run with TRITON_INTERPRET=1 to count deeppcr's Triton path on a CPU)")
    ap.add_argument("--layers", type=int, default=256)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--providers", default="eager,inductor,deeppcr-parallel")
    ap.add_argument("--form", choices=("modulelist", "stacked"), default="modulelist",
                    help="DeepMLP (an nn.Sequential of Linear layers) or StackedMLP (weight[i] of one stacked tensor)")
    a = ap.parse_args(argv)
    from pcr_compile.models import DeepMLP, StackedMLP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = (StackedMLP if a.form == "stacked" else DeepMLP)(layers=a.layers, width=a.width)
    x = torch.randn(a.batch, a.width)
    kernels = "triton" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available() \
        else "torch"
    builds = {"eager": lambda: model, "inductor": lambda: torch.compile(model),
              "deeppcr-parallel": lambda: torch.compile(model, backend="deeppcr",
                                                        options={"mode": "parallel", "kernels": kernels})}
    print(f"{type(model).__name__}({a.layers}, {a.width}) batch {a.batch}; deeppcr kernels={kernels!r}; GPU est.: "
          f"{ASSUMPTIONS}", flush=True)
    for label in a.providers.split(","):
        torch._dynamo.reset()
        fn = builds[label]()

        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)

        def train(fn=fn):
            for p in model.parameters():
                p.grad = None
            fn(x).float().pow(2).mean().backward()

        for phase, call in (("forward", fwd), ("forward_backward", train)):
            call()
            c = count_call(call)
            print(f"  {label:17s} {phase:16s} launches {c.launches:6d}  syncs {c.syncs:4d}  "
                  f"GPU est. (MODEL) {estimate_ms(c.launches, c.syncs):8.3f} ms  [{c.summary(8)}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
