"""The run loop: every case of a suite with every provider, rows appended to the CSV as each case finishes.

For each case (benchmarks.suites) the workload is built once, an eager reference output (and, for
trainable workloads, reference gradients) is computed, and then every provider runs on that same workload
and the same inputs, forward and (trainable workloads) training step (`measuring.measure_phase`). The
package's modules, one job each: `providers` (ways to run a workload), `timing` (the one timer, peak
memory), `counting` (kernel launches and host syncs), `gpu_model` (the launch-bound GPU estimate, a model),
`measuring` (one phase's rows), `output` (the CSV schema, shared with `kernel_bench.py`), `tables`.
Speed-ups are computed only between rows of one run (one `date`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .measuring import Config, eager_reference, forward_call, fresh_compiler, measure_phase, train_call
from .output import CsvSink, Env, RowMaker, environment, err_text
from .providers import Provider
from .suites import Case, SkipCase, Workload

log = logging.getLogger(__name__)


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
        rows.append(setup_row("setup", "", status="error", note=err_text(e)))
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
            with fresh_compiler(True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = p.build(wl.fn)
                forward_call(fn, wl)()
                train_call(fn, wl)()
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


