"""Measuring one provider on one workload in one phase: compile, error against eager, time, memory, solver
iterations, launches and host syncs (`counting.py`) and the launch-bound GPU estimate (`gpu_model.py`,
a model: its rows have status "model"), as rows of the CSV schema (`output.py`).

Phases:

- forward: `fn(*inputs)` under `torch.no_grad()`;
- forward_backward: a training step, `loss = fn(*inputs).float().pow(2).mean(); loss.backward()`
  (trainable workloads only: samplers are measured forward only).

Each phase starts from fresh compiler state (`torch._dynamo.reset()` inside Inductor's `fresh_cache()`,
which points TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR at a new temporary directory and clears the
in-memory caches), so the first call's wall time is the compile time. Error against eager:
max|y - y_eager| / max|y_eager| (outputs; for training, over all gradients). A provider that raises does
not stop the run: the phase gets a row with status "error" and the exception in `note`. Warnings the
backend logs (e.g. "falling back to Inductor") are kept in `note` too.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .counting import count_call
from .gpu_model import ASSUMPTIONS, estimate_ms
from .output import REPO, Env, RowMaker, err_text, metric_name
from .providers import Provider, triton_interpreted
from .suites import Case, Workload
from .timing import Timer, deadline, peak_memory_mib, quantiles, sync, time_call

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config(Timer):
    """A run's settings; the timer's fields (budget_s, min_reps, max_reps, warmup, min_sample_s) are inherited."""

    device: str = "cpu"
    train: bool = True  # measure the training step of trainable workloads
    timeout_s: float | None = None  # per phase (compile included); SIGALRM, main thread only
    memory: bool = True
    count: bool = True  # kernel launches and host syncs per call, and the launch-bound GPU estimate (a model)
    progress: bool = True
    warm_up: bool = True  # compile a two-layer model with every provider before measuring

    @classmethod
    def for_grid(cls, quick: bool, **overrides: Any) -> Config:
        base = cls(budget_s=0.4, min_reps=3, max_reps=200, warmup=1, timeout_s=240.0) if quick else \
            cls(budget_s=2.0, min_reps=10, max_reps=2000, warmup=3, timeout_s=3600.0)
        return cls(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})



@contextlib.contextmanager
def fresh_compiler(compiled: bool) -> Iterator[None]:
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
def backend_messages() -> Iterator[list[str]]:
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


def forward_call(fn: Callable[..., Any], wl: Workload) -> Callable[[], torch.Tensor]:
    def call():
        with torch.no_grad():
            return _as_tensor(fn(*wl.inputs))

    return call


def train_call(fn: Callable[..., Any], wl: Workload) -> Callable[[], torch.Tensor]:
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
    ref = Reference(out=forward_call(wl.fn, wl)().detach().clone())
    if train:
        train_call(wl.fn, wl)()
        ref.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in wl.params]
        for p in wl.params:
            p.grad = None
    return ref


def _solve_rows(row: RowMaker, phase: str, records: list[Any]) -> list[dict[str, str]]:
    if not records:
        return [row(metric_name("iters", phase), "iters", status="none",
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
        metric = metric_name("iters", phase, adjoint=direction != "forward")
        rows.append(row(metric, "iters", med, p20, p80, note=note))
        rows.append(row(metric_name("fallbacks", phase, adjoint=direction != "forward"),
                        "count", float(fell), note=f"of {len(recs)} solve(s)"))
    return rows


def count_rows(row: RowMaker, phase: str, provider: Provider, wl: Workload, call: Callable[[], Any],
               device: torch.device) -> list[dict[str, str]]:
    """Launches and host syncs of one call (`counting.py`) and the launch-bound GPU estimate (a model).

    On the CPU under TRITON_INTERPRET=1 a provider with a `triton_build` (deeppcr) is counted on its Triton
    path instead: compiled again with `kernels="triton"` and called once before counting.
    """
    path = "this device's code path"
    if provider.triton_build is not None and device.type == "cpu" and triton_interpreted():
        fn = provider.triton_build(wl.fn)
        call = forward_call(fn, wl) if phase == "forward" else train_call(fn, wl)
        call()
        path = "Triton path (kernels='triton') under TRITON_INTERPRET=1"
    elif provider.triton_build is not None and device.type == "cpu":
        path = "PyTorch kernels (CPU); set TRITON_INTERPRET=1 to count the Triton path"
    c = count_call(call)
    est = estimate_ms(c.launches, c.syncs)
    return [row(metric_name("launches", phase), "count", float(c.launches), note=f"{path}; {c.summary()}"),
            row(metric_name("syncs", phase), "count", float(c.syncs), note=path),
            row(metric_name("gpu_est", phase), "ms", est, status="model", note=ASSUMPTIONS)]


def overhead_rows(row: RowMaker, wl: Workload, call: Callable[[], Any], device: torch.device,
                  cfg: Config) -> list[dict[str, str]]:
    """Host work per forward call: the compiled call with the solve's device work removed
    (`overhead.solve_work_removed`: the solver returns its first result again) against the floor any
    torch.compile backend pays (the workload compiled with a backend returning a cached output).
    Runs last in the phase: the floor's compile resets Dynamo."""
    from .overhead import solve_work_removed
    from .providers import cached_output_backend

    with solve_work_removed() as stored:
        call()
        host = time_call(call, device, cfg)
    name, floor_name = metric_name("host_overhead", "forward"), metric_name("host_floor", "forward")
    if not stored:
        return [row(name, "ms", status="none", note="no chain was solved: no solve to remove")]
    torch._dynamo.reset()
    floor_call = forward_call(torch.compile(wl.fn, backend=cached_output_backend), wl)
    floor_call()
    floor = time_call(floor_call, device, cfg)
    torch._dynamo.reset()
    return [row(name, "ms", *host, note=f"solver returns a stored result: host work only; {host[0] / floor[0]:.2f}x "
                                        "the floor" if floor[0] else "solver returns a stored result"),
            row(floor_name, "ms", *floor, note="torch.compile with a backend returning a stored output")]


def measure_phase(case: Case, wl: Workload, provider: Provider, phase: str, ref: Reference, cfg: Config,
                  env: Env, device: torch.device) -> list[dict[str, str]]:
    """All metrics of one provider in one phase; an exception ends the phase with an error row."""
    row = RowMaker(env, case, provider.name, provider.mode)
    rows: list[dict[str, str]] = []
    step = phase
    with fresh_compiler(provider.compiled), backend_messages() as messages:
        try:
            with deadline(cfg.timeout_s):
                step = metric_name("compile", phase) if provider.compiled else phase
                fn = provider.build(wl.fn)
                call = forward_call(fn, wl) if phase == "forward" else train_call(fn, wl)
                sync(device)
                t0 = time.perf_counter()
                out = call()
                sync(device)
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
                    step = metric_name("peak_mem", phase)
                    mib = peak_memory_mib(call, device)
                    how = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark rise"
                    rows.append(row(step, "MiB", mib, status="ok" if mib is not None else "unavailable",
                                    note=how if mib is not None else "/proc/self/clear_refs not writable"))
                if provider.name == "deeppcr":
                    step = metric_name("iters", phase)
                    with _solves_context() as records:
                        call()
                    if records is None:
                        rows.append(row(step, "iters", status="unavailable", note="pcr_compile.record_solves missing"))
                    else:
                        rows += _solve_rows(row, phase, list(records))
                if cfg.count:
                    step = metric_name("launches", phase)
                    rows += count_rows(row, phase, provider, wl, call, device)
                if cfg.count and provider.name == "deeppcr" and phase == "forward":
                    step = metric_name("host_overhead", phase)
                    rows += overhead_rows(row, wl, call, device, cfg)
        except Exception as e:  # noqa: BLE001 -- a failing provider must not end the run
            log.debug("%s %s %s failed at %s", case.model, case.parameters, provider.label, step, exc_info=True)
            rows.append(row(step, "", status="error", note=err_text(e)))
        finally:
            for p in wl.params:
                p.grad = None
    if messages:
        unique = list(dict.fromkeys(messages))
        rows.append(row(metric_name("backend_warnings", phase), "count", float(len(messages)), status="warning",
                        note=" || ".join(unique[:3])))
    return rows

