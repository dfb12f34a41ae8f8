"""Compile the Triton kernels' specialisations for sm_90 (H100/H200) without a GPU, and read ptxas's report.

The interpreter (``TRITON_INTERPRET=1``) accepts programs the real compiler handles differently, and
register spills exist only in compiled code. This compiles each specialisation the launchers produce with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (the bundled ptxas; no device), runs
ptxas ``-v`` on its PTX and records registers and spill bytes.

    python -m pcr_compile.kernels.compile_check            # the representative set (tests/test_kernel_compile.py)
    python -m pcr_compile.kernels.compile_check --full     # every specialisation the launchers can produce
    python -m pcr_compile.kernels.compile_check --json     # one JSON object per line

Exit status 1 when a specialisation fails to compile or a float32 one spills (float64 spills are reported,
not failed: float64 blocks of 64 x 64 do not fit a thread's 255 registers). Must run without
``TRITON_INTERPRET`` (the kernels must be ``JITFunction`` s); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from . import settings

W_PADS = (2, 4, 8, 16, 32, 64)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
# pointer arguments that hold the compute dtype (summaries, carries, statistics); the rest hold the data's
_COMPUTE_PTRS = {"P_ptr", "s_ptr", "S_ptr", "carry_ptr", "stats_ptr", "status_ptr"}


@dataclass(frozen=True)
class Spec:
    """One specialisation: kernel name, storage dtype of its data, constexprs (name, value) and warps."""

    kernel: str
    dtype: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    @property
    def compute(self) -> str:
        return "fp64" if self.dtype == "fp64" else "fp32"


@dataclass(frozen=True)
class Result:
    spec: str
    compute: str
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error) or (self.compute == "fp32" and self.spill_bytes > 0)


def _kernels():
    from . import triton_dense, triton_elementwise, triton_newton

    return {
        "_dense_scan_kernel": triton_dense._dense_scan_kernel,
        "_dense_chunk_summary_kernel": triton_dense._dense_chunk_summary_kernel,
        "_elementwise_scan_kernel": triton_elementwise._elementwise_scan_kernel,
        "_elementwise_chunk_summary_kernel": triton_elementwise._elementwise_chunk_summary_kernel,
        "_newton_eval_kernel": triton_newton._newton_eval_kernel,
        "_newton_summary_kernel": triton_newton._newton_summary_kernel,
        "_newton_carry_kernel": triton_newton._newton_carry_kernel,
        "_newton_update_kernel": triton_newton._newton_update_kernel,
    }


# ------------------------------------------------------------------------ the specialisations, by launcher


def _acc(dtype: str):
    return settings.acc_dtype(DTYPES[dtype])


def dense_scan(reverse, carry, W_PAD, dtype):
    c = dict(REVERSE=reverse, HAS_CARRY=carry, W_PAD=W_PAD, ACC=_acc(dtype))
    return Spec("_dense_scan_kernel", dtype, tuple(c.items()), settings.dense_warps(W_PAD))


def dense_summary(reverse, W_PAD, dtype):
    ct = DTYPES[dtype]
    c = dict(REVERSE=reverse, W_PAD=W_PAD, ACC=_acc(dtype), USE_DOT=settings.use_dot(W_PAD),
             PREC=settings.dot_precision(settings.compute_dtype(ct)))
    return Spec("_dense_chunk_summary_kernel", dtype, tuple(c.items()), settings.dense_warps(W_PAD))


def elem_scan(reverse, has_a, carry, N, dtype):
    block, warps = settings.elementwise_settings(N)
    c = dict(REVERSE=reverse, HAS_A=has_a, HAS_CARRY=carry, BLOCK_N=block, ACC=_acc(dtype))
    return Spec("_elementwise_scan_kernel", dtype, tuple(c.items()), warps)


def elem_summary(reverse, has_a, N, dtype):
    block, warps = settings.elementwise_settings(N)
    c = dict(REVERSE=reverse, HAS_A=has_a, BLOCK_N=block, ACC=_acc(dtype))
    return Spec("_elementwise_chunk_summary_kernel", dtype, tuple(c.items()), warps)


def newton_eval(act, resid, bias, W_PAD, dtype):
    c = dict(TINY=torch.finfo(DTYPES[dtype]).tiny, ACT=act, RESID=resid, HAS_BIAS=bias, W_PAD=W_PAD, ACC=_acc(dtype))
    return Spec("_newton_eval_kernel", dtype, tuple(c.items()), settings.dense_warps(W_PAD))


def newton_summary(resid, W_PAD, dtype):
    c = dict(RESID=resid, W_PAD=W_PAD, ACC=_acc(dtype), USE_DOT=settings.use_dot(W_PAD),
             PREC=settings.dot_precision(DTYPES[dtype]))
    return Spec("_newton_summary_kernel", dtype, tuple(c.items()), settings.dense_warps(W_PAD))


def newton_carry(n_stats, W_PAD, dtype):
    block, warps = settings.reduce_settings(n_stats, W_PAD)
    c = dict(W_PAD=W_PAD, ACC=_acc(dtype), BLOCK=block)
    return Spec("_newton_carry_kernel", dtype, tuple(c.items()), warps)


def newton_update(resid, W_PAD, dtype):
    c = dict(RESID=resid, W_PAD=W_PAD, ACC=_acc(dtype))
    return Spec("_newton_update_kernel", dtype, tuple(c.items()), settings.dense_warps(W_PAD))


def representative() -> list[Spec]:
    """Every kernel; each structure, direction, dtype family and W_PAD 2..64 at least once; the widest
    float32 blocks (where spills happen) for every kernel that holds ``w x w`` blocks."""
    T, F = True, False
    return [
        dense_scan(F, F, 2, "fp32"), dense_scan(T, T, 64, "fp32"), dense_scan(F, T, 32, "bf16"),
        dense_scan(T, F, 16, "fp64"),
        dense_summary(F, 64, "fp32"), dense_summary(T, 32, "fp32"), dense_summary(F, 8, "fp64"),
        dense_summary(T, 4, "fp16"),
        elem_scan(F, T, F, 4096, "fp32"), elem_scan(T, F, T, 16, "bf16"), elem_scan(T, T, T, 100, "fp64"),
        elem_summary(F, T, 4096, "fp32"), elem_summary(T, F, 50, "fp16"),
        newton_eval(1, F, T, 64, "fp32"), newton_eval(3, T, F, 32, "fp32"), newton_eval(5, F, T, 4, "fp64"),
        newton_summary(F, 64, "fp32"), newton_summary(T, 32, "fp32"), newton_summary(F, 2, "fp64"),
        newton_carry(4096, 64, "fp32"), newton_carry(3, 16, "fp64"),
        newton_update(T, 64, "fp32"), newton_update(F, 8, "fp64"),
    ]


def full() -> list[Spec]:
    """Every specialisation the launchers can produce (block sizes from ``settings``)."""
    B, W, D = (False, True), W_PADS, tuple(DTYPES)
    ns = [1 << i for i in range(4, 11)]  # every BLOCK the reductions and elementwise scans can get
    specs = [dense_scan(r, c, w, d) for r, c, w, d in itertools.product(B, B, W, D)]
    specs += [dense_summary(r, w, d) for r, w, d in itertools.product(B, W, D)]
    specs += [elem_scan(r, a, c, n, d) for r, a, c, n, d in itertools.product(B, B, B, ns[:6], D)]
    specs += [elem_summary(r, a, n, d) for r, a, n, d in itertools.product(B, B, ns[:6], D)]
    newton_d = ("fp32", "fp64")  # the fused Newton iterates in the compute dtype
    specs += [newton_eval(a, r, b, w, d) for a, r, b, w, d in itertools.product(range(6), B, B, W, newton_d)]
    specs += [newton_summary(r, w, d) for r, w, d in itertools.product(B, W, newton_d)]
    specs += [newton_carry(n, w, d) for n, w, d in itertools.product(ns, W, newton_d)]
    specs += [newton_update(r, w, d) for r, w, d in itertools.product(B, W, newton_d)]
    return list(dict.fromkeys(specs))


# ---------------------------------------------------------------------------------------------- compiling


def _signature(fn, spec: Spec) -> dict[str, str]:
    const = dict(spec.constexprs)
    data, comp = "*" + spec.dtype, "*" + spec.compute
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = comp if name in _COMPUTE_PTRS else data
        elif name == "tol":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    if spec.kernel.startswith("_newton"):  # the fused Newton's buffers are all in the compute dtype
        sig = {k: ("*" + spec.compute if v.startswith("*") else v) for k, v in sig.items()}
    return sig


def _label(spec: Spec) -> str:
    const = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in spec.constexprs if k != "TINY")
    return f"{spec.kernel}[{spec.dtype}; {const}; warps={spec.num_warps}]"


def compile_spec(spec: Spec) -> Result:
    """Compile one specialisation for sm_90 and parse ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = _kernels()[spec.kernel]
    label = _label(spec)
    try:
        src = ASTSource(fn, _signature(fn, spec), dict(spec.constexprs))
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=spec.num_warps))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".cubin"],
                                 capture_output=True, text=True, check=True)
    except Exception as e:  # noqa: BLE001 -- a compile error is a result to report
        return Result(label, spec.compute, 0, 0, 0, error=f"{type(e).__name__}: {str(e)[:2000]}")
    return parse_ptxas(out.stderr, label, spec.compute)


def parse_ptxas(log: str, label: str, compute: str) -> Result:
    """Registers, spill bytes (stores + loads) and stack frame from a ``ptxas -v`` report."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        return Result(label, compute, 0, 0, 0, error=f"unreadable ptxas report: {log[-500:]}")
    stack, stores, loads = (int(x) for x in spill.groups())
    return Result(label, compute, int(regs.group(1)), stores + loads, stack)


def run(specs: list[Spec], jobs: int = 2) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels must be JITFunctions)")
    if jobs <= 1:
        return [compile_spec(s) for s in specs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_spec, specs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every specialisation the launchers can produce")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    results = run(full() if args.full else representative(), args.jobs)
    for r in results:
        if args.json:
            print(json.dumps({**asdict(r), "failed": r.failed}), flush=True)
        else:
            flag = "FAIL" if r.failed else "ok"
            print(f"{flag:4} regs={r.registers:3} spill={r.spill_bytes:5}B stack={r.stack_bytes:5}B  {r.spec}"
                  + (f"\n     {r.error}" if r.error else ""), flush=True)
    bad = [r for r in results if r.failed]
    print(f"{len(results)} specialisations, {len(bad)} failed", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
