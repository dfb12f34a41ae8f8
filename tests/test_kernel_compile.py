"""Every Triton kernel compiles for sm_90 (H100/H200) with the bundled ptxas, and no float32 one spills.

No GPU is needed: ``pcr_compile.kernels.compile_check`` compiles through ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` and reads ``ptxas -v``. It runs in a subprocess because the tests set
``TRITON_INTERPRET=1`` (under which ``@triton.jit`` kernels are interpreted functions, not compilable).
The representative set runs in ``make test``; every specialisation the launchers can produce in the slow set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pcr_compile.kernels import compile_check
from pcr_compile.kernels.compile_check import W_PADS, full, parse_ptxas, representative

pytest.importorskip("triton.backends.nvidia.compiler")


def compile_specs(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default either way; silences triton 3.9's warning
    out = subprocess.run([sys.executable, "-m", "pcr_compile.kernels.compile_check", "--json", *args],
                         capture_output=True, text=True, env=env, timeout=3000)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    return rows


def assert_all_compile_without_fp32_spills(rows: list[dict]) -> None:
    errors = [f"{r['spec']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    spills = [f"{r['spec']}: {r['spill_bytes']} B spilled, {r['registers']} registers"
              for r in rows if r["compute"] == "fp32" and r["spill_bytes"] > 0]
    assert not spills, "\n".join(spills)


def test_representative_set_covers_every_kernel_structure_direction_dtype_and_width():
    specs = representative()
    const = [dict(s.constexprs) for s in specs]
    assert {s.kernel for s in specs} == set(compile_check._kernels())
    assert {s.dtype for s in specs} == set(compile_check.DTYPES)
    assert {c["W_PAD"] for c in const if "W_PAD" in c} == set(W_PADS)
    assert {c["REVERSE"] for c in const if "REVERSE" in c} == {False, True}
    assert {c["HAS_A"] for c in const if "HAS_A" in c} == {False, True}  # diagonal and identity
    assert {c["RESID"] for c in const if "RESID" in c} == {False, True}
    for kernel in compile_check._kernels():  # the widest float32 block of every kernel, where spills happen
        widths = [c.get("W_PAD", c.get("BLOCK_N")) for s, c in zip(specs, const) if s.kernel == kernel
                  and s.compute == "fp32"]
        assert max(widths) >= 64, kernel
    assert set(specs) <= set(full())


def test_ptxas_report_is_read_and_fp32_spills_fail():
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 8 bytes spill stores, "
           "12 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    r = parse_ptxas(log, "k", "fp32")
    assert (r.registers, r.spill_bytes, r.stack_bytes, r.failed) == (255, 20, 8, True)
    assert not parse_ptxas(log, "k", "fp64").failed  # float64 spills are reported, not failed
    clean = log.replace("8 bytes spill stores, 12 bytes spill loads", "0 bytes spill stores, 0 bytes spill loads")
    assert not parse_ptxas(clean, "k", "fp32").failed
    assert parse_ptxas("garbage", "k", "fp32").failed


def test_representative_specialisations_compile_for_sm90_without_fp32_spills():
    rows = compile_specs()
    assert len(rows) == len(representative())
    assert_all_compile_without_fp32_spills(rows)


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm90_without_fp32_spills():
    rows = compile_specs("--full")
    assert len(rows) == len(full())
    assert_all_compile_without_fp32_spills(rows)
