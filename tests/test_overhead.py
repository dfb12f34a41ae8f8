"""Tests of benchmarks/overhead.py and the cached-output backend: what the host-overhead figures rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder at the repository root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import overhead, providers  # noqa: E402
from pcr_compile import solver  # noqa: E402
from pcr_compile.models import DeepMLP  # noqa: E402


def test_cached_output_backend_runs_the_graph_once():
    model = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    fn = torch.compile(model, backend=providers.cached_output_backend)
    with torch.no_grad():
        first = fn(x)
        second = fn(torch.zeros_like(x))  # same guards, another input: the stored output, nothing computed
    assert torch.equal(first, model(x).detach())
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, first)


def test_fresh_output_backend_allocates_each_call():
    model = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    fn = torch.compile(model, backend=providers.fresh_output_backend)
    with torch.no_grad():
        first, second = fn(x), fn(x)
    assert first.shape == second.shape == (2, 3) and first.dtype == second.dtype
    assert first.data_ptr() != second.data_ptr()


def test_solve_work_removed_returns_the_first_result_and_restores():
    torch.manual_seed(0)
    model = DeepMLP(layers=9, width=4)
    x = torch.randn(3, 4)
    real = solver.run_forward
    fn = torch.compile(model, backend="deeppcr", options={"mode": "parallel", "strict": True})
    with torch.no_grad():
        ref = model(x)
        with overhead.solve_work_removed() as stored:
            a = fn(x)
            b = fn(x * 0)  # a different input: the stored result comes back, no solve ran
        assert len(stored) == 1
        assert torch.allclose(a, ref, atol=1e-5) and torch.equal(a, b)
        assert solver.run_forward is real
        c = fn(x * 0)  # the real solve again
    assert torch.allclose(c, model(x * 0), atol=1e-5) and not torch.equal(c, b)


def test_rounds_are_summarised_by_medians_and_per_round_ratios():
    def run(floor, ours):
        return [("cached-output", "floor", floor, floor, floor, ""),
                ("deeppcr", "parallel-no-solve", ours, ours, ours, "")]

    rows, spread = overhead._over_rounds([run(1.0, 2.0), run(2.0, 2.2), run(1.0, 1.3)])
    assert [r[:3] for r in rows] == [("cached-output", "floor", 1.0), ("deeppcr", "parallel-no-solve", 2.0)]
    lo, mid, hi = spread["parallel-no-solve"]
    assert (lo, mid, hi) == (1.1, 1.3, 2.0)
