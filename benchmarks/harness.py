"""Measurement harness: providers, timing, metrics, the tidy CSV and the summary tables.

For each case (benchmarks.suites) the workload is built once, an eager reference output (and, for
trainable workloads, reference gradients) is computed, and then every provider runs on that same workload
and the same inputs, in two phases:

- forward: `fn(*inputs)` under `torch.no_grad()`;
- forward_backward: a training step, `loss = fn(*inputs).float().pow(2).mean(); loss.backward()`
  (trainable workloads only: samplers are measured forward only).

Each phase starts from fresh compiler state (`torch._dynamo.reset()` inside Inductor's `fresh_cache()`,
which points TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR at a new temporary directory and clears the
in-memory caches), so the first call's wall time is the compile time. Then, per phase:

- time: `triton.testing.do_bench` on CUDA (median / p20 / p80); on the CPU repeated wall-clock samples
  (each sample the mean of enough back-to-back calls to last >= 1 ms, gc off), median / p20 / p80. The
  CLI runs CPU benchmarks on one intra-op thread unless told otherwise (`--threads`): on a shared
  2-core machine OpenMP's spin-waiting makes multi-threaded timings 10-100x slower, at random;
- peak memory: CUDA `max_memory_allocated` above what was allocated before the call; CPU the rise of the
  process's resident-set high-water mark during one call (Linux: `/proc/self/clear_refs` resets VmHWM).
  The CPU figure counts pages newly touched, so memory the allocator had already mapped and reuses is not
  seen: a lower bound, reported in MiB, and "unavailable" where /proc cannot be reset;
- Newton / Picard iterations and fallbacks, from `pcr_compile.record_solves()` (deeppcr providers);
- error against eager: max|y - y_eager| / max|y_eager| (outputs; for training, over all gradients).

A provider that raises does not stop the run: the phase gets a row with status "error" and the
exception in `note`, and the run goes on. Warnings the backend logs (e.g. "falling back to Inductor")
are kept in `note` too. Speed-ups are computed only between rows of one run (one `date`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import logging
import math
import os
import platform
import re
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .suites import Case, SkipCase, Workload

log = logging.getLogger(__name__)

COLUMNS = ("model", "provider", "mode", "metric", "unit", "parameters", "median", "p20", "p80", "status", "note",
           "device", "torch_version", "project_version", "commit", "date")
PHASES = ("forward", "forward_backward")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    """A way to run a workload. `build(fn)` returns the callable to measure (compiling lazily, on first call)."""

    name: str  # eager | inductor | deeppcr
    mode: str  # "-" for eager; "default" / "reduce-overhead" for inductor; "parallel" / "auto" for deeppcr
    build: Callable[[Callable[..., Any]], Callable[..., Any]]
    compiled: bool = True
    cuda_only: bool = False
    skip_note: str = ""

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
        Provider("deeppcr", "parallel", _deeppcr("parallel", opts)),
        Provider("deeppcr", "auto", _deeppcr("auto", opts)),
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


# ---------------------------------------------------------------------------------------------- config, environment


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    train: bool = True  # measure the training step of trainable workloads
    budget_s: float = 1.0  # CPU: wall-clock time per timed metric (after warm-up); CUDA: do_bench's `rep`
    min_reps: int = 5
    max_reps: int = 500
    warmup: int = 2  # CPU warm-up calls after the first (compiling) call
    min_sample_s: float = 1e-3  # CPU: a sample loops over back-to-back calls for at least this long
    timeout_s: float | None = None  # per phase (compile included); SIGALRM, main thread only
    memory: bool = True
    progress: bool = True
    warm_up: bool = True  # compile a two-layer model with every provider before measuring

    @classmethod
    def for_grid(cls, quick: bool, **overrides: Any) -> Config:
        base = cls(budget_s=0.4, min_reps=3, max_reps=200, warmup=1, timeout_s=240.0) if quick else \
            cls(budget_s=2.0, min_reps=10, max_reps=2000, warmup=3, timeout_s=3600.0)
        return cls(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


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


# ---------------------------------------------------------------------------------------------- rows


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


@dataclass
class RowMaker:
    env: Env
    case: Case
    provider_name: str
    mode: str

    def __call__(self, metric: str, unit: str, median: float | None = None, p20: float | None = None,
                 p80: float | None = None, status: str = "ok", note: str = "") -> dict[str, str]:
        return {"model": self.case.model, "provider": self.provider_name, "mode": self.mode, "metric": metric,
                "unit": unit, "parameters": self.case.parameters, "median": _fmt(median),
                "p20": _fmt(p20 if p20 is not None else median), "p80": _fmt(p80 if p80 is not None else median),
                "status": status, "note": " ".join(note.split())[:500], "device": self.env.device,
                "torch_version": self.env.torch_version, "project_version": self.env.project_version,
                "commit": self.env.commit, "date": self.env.date}


def _err_text(e: BaseException) -> str:
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


# ---------------------------------------------------------------------------------------------- measuring


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise PhaseTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise PhaseTimeout(f"phase exceeded the {seconds:.0f} s timeout")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _fresh_compiler(compiled: bool) -> Iterator[None]:
    if not compiled:
        yield
        return
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with fresh_cache():
        try:
            yield
        finally:
            torch._dynamo.reset()


class _Messages(logging.Handler):
    """Collects warnings logged under `pcr_compile` (and warnings.warn from its files) during a phase."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.name}: {record.getMessage().splitlines()[0]}")
        except Exception:  # a malformed record must not break a measurement
            self.lines.append(f"{record.name}: <unprintable log record>")


@contextlib.contextmanager
def _backend_messages() -> Iterator[list[str]]:
    handler = _Messages()
    logger = logging.getLogger("pcr_compile")
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.lines
        finally:
            logger.removeHandler(handler)
            for w in caught:
                if "pcr_compile" in str(w.filename) or str(REPO / "passes") in str(w.filename) \
                        or str(REPO / "kernels") in str(w.filename):
                    handler.lines.append(f"{w.category.__name__}: {str(w.message).splitlines()[0]}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation."""
    s = sorted(xs)
    return _percentile(s, 0.5), _percentile(s, 0.2), _percentile(s, 0.8)


def time_call(fn: Callable[[], Any], device: torch.device, cfg: Config) -> tuple[float, float, float]:
    """Median, p20, p80 of one call, in milliseconds. `fn` must already be compiled (called once)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=max(1, int(cfg.budget_s * 1000)), quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(cfg.warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    inner = max(1, min(10_000, int(cfg.min_sample_s / max(est, 1e-9))))
    samples: list[float] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(samples) < cfg.max_reps:
            if len(samples) >= cfg.min_reps and time.perf_counter() - start >= cfg.budget_s:
                break
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return quantiles(samples)


def _rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", s, re.M).group(1))
    hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", s, re.M).group(1))
    return rss, hwm


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call above what was in use before it (MiB); None where it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        rss, _ = _rss_kib()
        fn()
        _, hwm = _rss_kib()
    except (OSError, AttributeError):
        return None
    return max(0, hwm - rss) / 1024


def _as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"workload returned {type(out).__name__}, not a tensor")


def max_rel_err(got: Sequence[torch.Tensor | None], ref: Sequence[torch.Tensor]) -> float:
    """max |got - ref| / max |ref| over all tensors (float64); a missing tensor counts as zeros."""
    num = den = 0.0
    for g, r in zip(got, ref, strict=True):
        r64 = r.detach().double()
        g64 = torch.zeros_like(r64) if g is None else g.detach().double()
        num = max(num, float((g64 - r64).abs().max()) if r64.numel() else 0.0)
        den = max(den, float(r64.abs().max()) if r64.numel() else 0.0)
    return num / den if den > 0 else num


def _solves_context():
    try:
        from pcr_compile import record_solves
    except Exception:  # the backend is not importable: no records
        return contextlib.nullcontext(None)
    return record_solves()


def _forward_call(fn: Callable[..., Any], wl: Workload) -> Callable[[], torch.Tensor]:
    def call():
        with torch.no_grad():
            return _as_tensor(fn(*wl.inputs))

    return call


def _train_call(fn: Callable[..., Any], wl: Workload) -> Callable[[], torch.Tensor]:
    def call():
        for p in wl.params:
            p.grad = None
        out = _as_tensor(fn(*wl.inputs))
        out.float().pow(2).mean().backward()
        return out

    return call


@dataclass
class Reference:
    out: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)


def eager_reference(wl: Workload, train: bool) -> Reference:
    ref = Reference(out=_forward_call(wl.fn, wl)().detach().clone())
    if train:
        _train_call(wl.fn, wl)()
        ref.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in wl.params]
        for p in wl.params:
            p.grad = None
    return ref


def _solve_rows(row: RowMaker, phase: str, records: list[Any]) -> list[dict[str, str]]:
    if not records:
        return [row(f"iters_{phase}", "iters", status="none",
                    note="no chain solve recorded (nothing solved in parallel)")]
    rows = []
    for direction in ("forward", "backward"):
        recs = [r for r in records if getattr(r, "direction", "forward") == direction]
        if not recs:
            continue
        its = [float(getattr(r, "iterations", float("nan"))) for r in recs]
        med, p20, p80 = quantiles(its)
        fell = sum(bool(getattr(r, "fell_back", False)) for r in recs)
        conv = sum(bool(getattr(r, "converged", False)) for r in recs)
        lengths = sorted({int(getattr(r, "length", 0)) for r in recs})
        jac = sorted({str(getattr(r, "jacobian", "")) for r in recs} - {""})
        reasons = sorted({str(getattr(r, "reason", "")) for r in recs} - {""})
        note = (f"{len(recs)} solve(s), chain length(s) {lengths}, converged {conv}/{len(recs)}, "
                f"fell back {fell}" + (f", jacobian {','.join(jac)}" if jac else "")
                + (f", reasons: {'; '.join(reasons)}" if reasons else ""))
        metric = f"iters_{phase}" if direction == "forward" else f"iters_{phase}_adjoint"
        rows.append(row(metric, "iters", med, p20, p80, note=note))
        rows.append(row(f"fallbacks_{phase}" if direction == "forward" else f"fallbacks_{phase}_adjoint",
                        "count", float(fell), note=f"of {len(recs)} solve(s)"))
    return rows


def measure_phase(case: Case, wl: Workload, provider: Provider, phase: str, ref: Reference, cfg: Config,
                  env: Env, device: torch.device) -> list[dict[str, str]]:
    """All metrics of one provider in one phase; an exception ends the phase with an error row."""
    row = RowMaker(env, case, provider.name, provider.mode)
    rows: list[dict[str, str]] = []
    step = phase
    with _fresh_compiler(provider.compiled), _backend_messages() as messages:
        try:
            with _deadline(cfg.timeout_s):
                step = f"compile_{phase}" if provider.compiled else phase
                fn = provider.build(wl.fn)
                call = _forward_call(fn, wl) if phase == "forward" else _train_call(fn, wl)
                _sync(device)
                t0 = time.perf_counter()
                out = call()
                _sync(device)
                first = time.perf_counter() - t0
                if provider.compiled:
                    rows.append(row(step, "s", first, note="first call, fresh caches"))
                step = "max_rel_err" if phase == "forward" else "max_rel_err_grad"
                if phase == "forward":
                    err = max_rel_err([out], [ref.out])
                else:
                    err = max_rel_err([p.grad for p in wl.params], ref.grads)
                missing = 0 if phase == "forward" else sum(p.grad is None for p in wl.params)
                rows.append(row(step, "1", err, note=f"{missing} parameter(s) got no gradient" if missing else ""))
                step = phase
                rows.append(row(phase, "ms", *time_call(call, device, cfg)))
                if cfg.memory:
                    step = f"peak_mem_{phase}"
                    mib = peak_memory_mib(call, device)
                    how = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark rise"
                    rows.append(row(step, "MiB", mib, status="ok" if mib is not None else "unavailable",
                                    note=how if mib is not None else "/proc/self/clear_refs not writable"))
                if provider.name == "deeppcr":
                    step = f"iters_{phase}"
                    with _solves_context() as records:
                        call()
                    if records is None:
                        rows.append(row(step, "iters", status="unavailable", note="pcr_compile.record_solves missing"))
                    else:
                        rows += _solve_rows(row, phase, list(records))
        except Exception as e:  # noqa: BLE001 -- a failing provider must not end the run
            log.debug("%s %s %s failed at %s", case.model, case.parameters, provider.label, step, exc_info=True)
            rows.append(row(step, "", status="error", note=_err_text(e)))
        finally:
            for p in wl.params:
                p.grad = None
    if messages:
        unique = list(dict.fromkeys(messages))
        rows.append(row(f"backend_warnings_{phase}", "count", float(len(messages)), status="warning",
                        note=" || ".join(unique[:3])))
    return rows


def measure_case(case: Case, providers: Sequence[Provider], cfg: Config, env: Env,
                 on_provider: Callable[[Provider], None] | None = None) -> list[dict[str, str]]:
    device = torch.device(cfg.device)
    rows: list[dict[str, str]] = []
    tick = on_provider or (lambda p: None)
    setup_row = RowMaker(env, case, "*", "-")
    try:
        wl = case.build(device)
        ref = eager_reference(wl, train=cfg.train and wl.trainable)
    except SkipCase as e:
        rows.append(setup_row("setup", "", status="skipped", note=str(e)))
        for p in providers:
            tick(p)
        return rows
    except Exception as e:  # noqa: BLE001
        log.debug("setup of %s %s failed", case.model, case.parameters, exc_info=True)
        rows.append(setup_row("setup", "", status="error", note=_err_text(e)))
        for p in providers:
            tick(p)
        return rows
    for p in providers:
        if p.cuda_only and device.type != "cuda":
            rows.append(RowMaker(env, case, p.name, p.mode)("all", "", status="skipped", note=p.skip_note))
        elif case.only and p.label not in case.only:
            rows.append(RowMaker(env, case, p.name, p.mode)("all", "", status="skipped", note=case.why))
        else:
            rows += measure_phase(case, wl, p, "forward", ref, cfg, env, device)
            if cfg.train and wl.trainable:
                rows += measure_phase(case, wl, p, "forward_backward", ref, cfg, env, device)
        tick(p)
    return rows


def warm_up(providers: Sequence[Provider], device: torch.device) -> None:
    """Pay the once-per-process costs (imports, the C++ toolchain's first start, backend registration) on a
    two-layer model before measuring, so that they do not land in the first case's compile time."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).to(device)
    wl = Workload(model, (torch.randn(2, 4, device=device),), list(model.parameters()))
    for p in providers:
        if not p.compiled or (p.cuda_only and device.type != "cuda"):
            continue
        try:
            with _fresh_compiler(True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = p.build(wl.fn)
                _forward_call(fn, wl)()
                _train_call(fn, wl)()
        except Exception:  # noqa: BLE001 -- the measurement itself will record the error
            log.debug("warm-up of %s failed", p.label, exc_info=True)
    for q in wl.params:
        q.grad = None


def run_benchmarks(cases: Sequence[Case], providers: Sequence[Provider], cfg: Config, csv_path: Path | None,
                   env: Env | None = None) -> list[dict[str, str]]:
    """Measure every case with every provider; append rows to `csv_path` as each case finishes."""
    env = env or environment(torch.device(cfg.device))
    if cfg.warm_up:
        warm_up(providers, torch.device(cfg.device))
    sink = CsvSink(csv_path) if csv_path else None
    rows: list[dict[str, str]] = []
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases) * len(providers), unit="run", dynamic_ncols=True)
        except ImportError:
            bar = None

    try:
        for case in cases:
            def tick(p: Provider, case: Case = case) -> None:
                if bar is not None:
                    bar.update(1)

            if bar is not None:
                bar.set_description(f"{case.model} {case.parameters}")
            case_rows = measure_case(case, providers, cfg, env, tick)
            rows += case_rows
            if sink:
                sink.write(case_rows)
    finally:
        if bar is not None:
            bar.close()
        if sink:
            sink.close()
    return rows


# ---------------------------------------------------------------------------------------------- tables


def _num(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def latest_run(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of the most recent run (`date`) per device: what speed-ups may be computed from."""
    last: dict[str, str] = {}
    for r in rows:
        last[r["device"]] = max(last.get(r["device"], ""), r["date"])
    return [r for r in rows if r["date"] == last[r["device"]]]


def _label(provider: str, mode: str) -> str:
    return provider if mode in ("-", "default", "") else f"{provider}-{mode}"


def _g(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def tables(rows: Sequence[dict[str, str]], fmt: str = "github") -> str:
    """One table per (model, device): times, speed-ups against eager and inductor, compile, memory, iters, error."""
    from tabulate import tabulate

    out = []
    index: dict[tuple[str, ...], dict[str, str]] = {}
    order: dict[tuple[str, str], list[tuple[str, str]]] = {}
    flags: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for r in rows:
        key = (r["device"], r["model"])
        entry = (r["parameters"], _label(r["provider"], r["mode"]))
        if r["provider"] != "*":
            order.setdefault(key, [])
            if entry not in order[key]:
                order[key].append(entry)
        index[(r["device"], r["model"], r["parameters"], _label(r["provider"], r["mode"]), r["metric"])] = r
        if r["status"] in ("error", "skipped", "warning"):
            flags.setdefault((r["device"], r["model"], r["parameters"], _label(r["provider"], r["mode"])),
                             []).append(r)

    def val(dev, model, params, label, metric):
        r = index.get((dev, model, params, label, metric))
        return _num(r["median"]) if r and r["status"] == "ok" else None

    for (dev, model), entries in order.items():
        has_train = any(val(dev, model, p, lab, "forward_backward") is not None for p, lab in entries)
        table = []
        for params, label in entries:
            flagged = flags.get((dev, model, params, label), [])
            status = sorted({f"{r['metric']}: {r['status']}" for r in flagged if r["status"] != "warning"})
            warn = any(r["status"] == "warning" for r in flagged)
            line = [params, label]
            for phase in PHASES if has_train else PHASES[:1]:
                t = val(dev, model, params, label, phase)
                line.append(_g(t))
                for base in ("eager", "inductor"):
                    b = val(dev, model, params, base, phase)
                    line.append(f"{b / t:.2f}x" if t and b else "-")
            comp = [val(dev, model, params, label, f"compile_{ph}") for ph in (PHASES if has_train else PHASES[:1])]
            line.append("/".join(_g(c) for c in comp))
            mem = [val(dev, model, params, label, f"peak_mem_{ph}") for ph in (PHASES if has_train else PHASES[:1])]
            line.append("/".join(_g(m) for m in mem))
            its = [val(dev, model, params, label, m) for m in
                   (("iters_forward", "iters_forward_backward_adjoint") if has_train else ("iters_forward",))]
            fb = val(dev, model, params, label, "fallbacks_forward")
            line.append("/".join(_g(i) for i in its) + (f" (fb {fb:.0f})" if fb else ""))
            errs = [val(dev, model, params, label, m) for m in
                    (("max_rel_err", "max_rel_err_grad") if has_train else ("max_rel_err",))]
            line.append("/".join("-" if e is None else f"{e:.1e}" for e in errs))
            line.append("; ".join(status) if status else ("ok, warned" if warn else "ok"))
            table.append(line)
        head = ["parameters", "provider", "fwd ms", "fwd vs eager", "fwd vs inductor"]
        if has_train:
            head += ["fwd+bwd ms", "fwd+bwd vs eager", "fwd+bwd vs inductor"]
        suffix = " fwd/train" if has_train else " fwd"
        head += ["compile s" + suffix, "peak MiB" + suffix, "iters" + (" fwd/adjoint" if has_train else " fwd"),
                 "max rel err" + (" out/grad" if has_train else " out"), "status"]
        out.append(f"### {model} ({dev})\n\n" + tabulate(table, headers=head, tablefmt=fmt, disable_numparse=True))
    return "\n\n".join(out)


def problems(rows: Sequence[dict[str, str]]) -> str:
    """Failures, skips and backend warnings, one line each."""
    lines = []
    for status, title in (("error", "Failures"), ("skipped", "Skipped"), ("warning", "Backend warnings")):
        sel = [r for r in rows if r["status"] == status]
        if not sel:
            continue
        lines.append(f"{title} ({len(sel)}):")
        if status == "skipped":  # the same reason for many cases: one line per (provider, reason)
            groups: dict[tuple[str, str], list[str]] = {}
            for r in sel:
                groups.setdefault((_label(r["provider"], r["mode"]), r["note"]), []).append(
                    f"{r['model']} [{r['parameters']}]")
            for (label, note), where in groups.items():
                lines.append(f"  {label}: {note} -- {len(where)} case(s): {', '.join(where[:3])}"
                             + (", ..." if len(where) > 3 else ""))
            continue
        for r in sel:
            lines.append(f"  {r['model']} [{r['parameters']}] {_label(r['provider'], r['mode'])} "
                         f"{r['metric']}: {r['note']}")
    return "\n".join(lines) if lines else "No failures."


def header(env: Env, extra: str = "") -> str:
    return (f"device: {env.device}; torch {env.torch_version}; pcr_compile {env.project_version}; "
            f"commit {env.commit}; date {env.date}" + (f"; {extra}" if extra else ""))


def env_of(rows: Sequence[dict[str, str]]) -> Env | None:
    if not rows:
        return None
    r = rows[0]
    return Env(r["device"], r["torch_version"], r["project_version"], r["commit"], r["date"])
