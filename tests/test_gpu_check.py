"""The GPU machine's one command, ``benchmarks/gpu_check.sh``, rehearsed on CPU (``--dry-run``: tiny sizes,
``CUDA_VISIBLE_DEVICES=`` and the Triton interpreter): every step runs and the outputs are where it says."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.tar.gz", "gpu_check.log", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "steps: install=0 warm=0 tests=0 kernel_bench=0 headline=0" in summary
    for provider in ("eager", "inductor", "reduce-overhead", "deeppcr"):
        assert provider in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"headline.csv", "kernel_bench.csv", "pytest0.xml"} <= names
