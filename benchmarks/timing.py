"""The one timer of the benchmarks (harness and `kernel_bench.py`), peak memory, and the phase deadline.

- time: `triton.testing.do_bench` on CUDA (median / p20 / p80); on the CPU repeated wall-clock samples
  (each sample the mean of enough back-to-back calls to last >= `min_sample_s`, gc off), median / p20 / p80;
- peak memory: CUDA `max_memory_allocated` above what was allocated before the call; CPU the rise of the
  process's resident-set high-water mark during one call (Linux: `/proc/self/clear_refs` resets VmHWM).
  The CPU figure counts pages newly touched, so memory the allocator had already mapped and reuses is not
  seen: a lower bound, in MiB, and None where /proc cannot be reset.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timer:
    """How long and how often `time_call` samples. CUDA: `budget_s` is do_bench's `rep` (ms = 1000 x s)."""

    budget_s: float = 1.0  # CPU: wall-clock time per timed metric (after warm-up)
    min_reps: int = 5
    max_reps: int = 500
    warmup: int = 2  # CPU warm-up calls before the estimate
    min_sample_s: float = 1e-3  # CPU: a sample loops over back-to-back calls for at least this long
    cuda_warmup_ms: int = 25


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
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



def sync(device: torch.device) -> None:
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


def time_call(fn: Callable[[], Any], device: torch.device, cfg: Timer) -> tuple[float, float, float]:
    """Median, p20, p80 of one call, in milliseconds. `fn` must already be compiled (called once)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=cfg.cuda_warmup_ms, rep=max(1, int(cfg.budget_s * 1000)),
                                 quantiles=[0.5, 0.2, 0.8])
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
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

