"""Output: the one tidy CSV schema of every benchmark here (the harness and `kernel_bench.py`), the run's
environment, rows and the CSV sink.

Every row is one metric of one (model, provider, mode, parameters) at one run (`date`): `median`, `p20`,
`p80` in `unit`, a `status` ("ok", "error", "skipped", "warning", "none", "unavailable", "model") and a
`note`. Rows whose status is "model" hold figures computed from a model (the launch-bound GPU estimate,
`benchmarks/gpu_model.py`), never measured ones; their note states the model's assumptions.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COLUMNS = ("model", "provider", "mode", "metric", "unit", "parameters", "median", "p20", "p80", "status", "note",
           "device", "torch_version", "project_version", "commit", "date")
PHASES = ("forward", "forward_backward")


def metric_name(kind: str, phase: str, adjoint: bool = False) -> str:
    """The one spelling of a per-phase metric: `iters_forward`, `launches_forward_backward`,
    `iters_forward_backward_adjoint` (the adjoint solves of a training step); writers and readers use it."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return f"{kind}_{phase}" + ("_adjoint" if adjoint else "")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Env:
    device: str
    torch_version: str
    project_version: str
    commit: str
    date: str


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _project_version() -> str:
    try:
        from importlib.metadata import version

        return version("pcr_compile")
    except Exception:  # not installed: read the package
        try:
            import pcr_compile

            return getattr(pcr_compile, "__version__", "unknown")
        except Exception:
            return "unknown"


def environment(device: torch.device) -> Env:
    if device.type == "cuda":
        dev = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        n = torch.get_num_threads()
        dev = f"cpu: {_cpu_name()} ({os.cpu_count()} cores, {n} thread{'' if n == 1 else 's'})"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Env(dev, torch.__version__, _project_version(), _commit(), date)


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def make_row(env: Env, model: str, provider: str, mode: str, parameters: str, metric: str, unit: str,
             median: float | None = None, p20: float | None = None, p80: float | None = None, status: str = "ok",
             note: str = "") -> dict[str, str]:
    """One CSV row (every column of COLUMNS); p20 / p80 default to the median."""
    return {"model": model, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "parameters": parameters, "median": _fmt(median), "p20": _fmt(p20 if p20 is not None else median),
            "p80": _fmt(p80 if p80 is not None else median), "status": status, "note": " ".join(note.split())[:500],
            "device": env.device, "torch_version": env.torch_version, "project_version": env.project_version,
            "commit": env.commit, "date": env.date}


@dataclass
class RowMaker:
    """Rows of one case and provider: `row(metric, unit, median, ...)`."""

    env: Env
    case: Any
    provider_name: str
    mode: str

    def __call__(self, metric: str, unit: str, median: float | None = None, p20: float | None = None,
                 p80: float | None = None, status: str = "ok", note: str = "") -> dict[str, str]:
        return make_row(self.env, self.case.model, self.provider_name, self.mode, self.case.parameters, metric,
                        unit, median, p20, p80, status, note)


def err_text(e: BaseException) -> str:
    msg = [ln.strip() for ln in str(e).strip().splitlines()
           if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln and "TORCH_LOGS" not in ln]
    # Dynamo wraps backend failures; the first lines name the real exception.
    return f"{type(e).__name__}: {' | '.join(msg[:3])}" if msg else type(e).__name__


class CsvSink:
    """Appends rows to a CSV (header written when the file is new); flushed after every case."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:
                raise ValueError(f"{self.path} has columns {header}, expected {list(COLUMNS)}: use another --out")
            new = False
        else:
            new = True
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()

    def write(self, rows: Sequence[dict[str, str]]) -> None:
        self._w.writerows(rows)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def write_csv(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Append `rows` to the CSV at `path` (created with its header when new)."""
    sink = CsvSink(path)
    try:
        sink.write(rows)
    finally:
        sink.close()


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(COLUMNS) - set(rows[0]):
        raise ValueError(f"{path} lacks columns {sorted(set(COLUMNS) - set(rows[0]))}")
    return rows


def header(env: Env, extra: str = "") -> str:
    return (f"device: {env.device}; torch {env.torch_version}; pcr_compile {env.project_version}; "
            f"commit {env.commit}; date {env.date}" + (f"; {extra}" if extra else ""))


def env_of(rows: Sequence[dict[str, str]]) -> Env | None:
    if not rows:
        return None
    r = rows[0]
    return Env(r["device"], r["torch_version"], r["project_version"], r["commit"], r["date"])
