"""Tests of the benchmark package (benchmarks/): the CLI on a tiny grid, error rows, CSV, tables, plots.

Nothing here depends on a timing value: only on the structure of what the harness writes.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder at the repository root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, measuring, output, plots, providers, suites, tables, timing  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402

pytest.importorskip("matplotlib")
pytest.importorskip("tabulate")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == output.COLUMNS
        return list(reader)


def _cfg(**kw) -> measuring.Config:
    base = dict(device="cpu", train=True, budget_s=0.0, min_reps=2, max_reps=2, warmup=0, progress=False,
                warm_up=False, timeout_s=120.0)
    return measuring.Config(**{**base, **kw})


def test_cli_tiny_grid_writes_csv_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["run", "--suite", "smoke", "--quick", "--device", "cpu", "--out", str(out), "--no-train",
               "--providers", "eager,inductor,deeppcr-parallel", "--reps", "2", "--no-progress", "--no-warm-up"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "### deep_mlp" in printed
    for label in ("eager", "inductor", "deeppcr-parallel"):
        assert f"| {label} " in printed
    assert "fwd vs eager" in printed and "fwd vs inductor" in printed

    rows = _read(out / "results.csv")
    assert {r["provider"] for r in rows} == {"eager", "inductor", "deeppcr"}
    assert {r["model"] for r in rows} == {"deep_mlp"}
    assert {r["parameters"] for r in rows} == {"layers=8,width=4,batch=2"}
    assert len({r["date"] for r in rows}) == 1 and all(r["torch_version"] == torch.__version__ for r in rows)
    assert all(r["device"].startswith("cpu") for r in rows)
    by = {(r["provider"], r["metric"]): r for r in rows}
    # Eager and Inductor run this model: their rows are complete.
    for prov in ("eager", "inductor"):
        fwd = by[(prov, "forward")]
        assert fwd["status"] == "ok" and fwd["unit"] == "ms"
        assert float(fwd["p20"]) <= float(fwd["median"]) <= float(fwd["p80"])
        assert by[(prov, "max_rel_err")]["status"] == "ok"
    assert by[("inductor", "compile_forward")]["unit"] == "s"
    # Counts per call for every provider, and the GPU estimate labelled as a model beside them.
    assert by[("eager", "launches_forward")]["median"] == "16"  # 8 x (addmm + tanh)
    assert by[("eager", "syncs_forward")]["median"] == "0"
    for prov in ("eager", "inductor"):
        est = by[(prov, "gpu_est_forward")]
        assert est["status"] == "model" and est["unit"] == "ms" and "MODEL" in est["note"]
        assert float(by[(prov, "launches_forward")]["median"]) > 0
    assert "GPU est. ms (MODEL)" in printed and "GPU est.: MODEL, not measured" in printed
    assert float(by[("inductor", "max_rel_err")]["median"]) < 1e-4
    assert not any(r["metric"].startswith("forward_backward") for r in rows)  # --no-train
    # deeppcr either works or is recorded as an error; never missing.
    pcr = [r for r in rows if r["provider"] == "deeppcr"]
    assert pcr and all(r["mode"] == "parallel" for r in pcr)
    assert any(r["metric"] == "forward" or r["status"] == "error" for r in pcr)
    # Host work per call with the solve removed, against the cached-output floor (deeppcr's forward only).
    host, floor = by[("deeppcr", "host_overhead_forward")], by[("deeppcr", "host_floor_forward")]
    assert host["status"] == "ok" and host["unit"] == "ms" and "the floor" in host["note"], host
    assert 0 < float(floor["median"]) and 0 < float(host["median"]), (host, floor)
    assert ("eager", "host_overhead_forward") not in by
    assert "host ms fwd (x floor)" in printed

    pngs = list((out / "plots").glob("*.png"))
    assert any(p.name.startswith("deep_mlp_forward_speedup") for p in pngs)
    assert (out / "tables.md").read_text().startswith("# Benchmark run")

    # `table` reads the CSV back and prints the same table.
    assert main(["table", str(out / "results.csv")]) == 0
    assert "### deep_mlp" in capsys.readouterr().out


def _broken_build(fn):
    raise RuntimeError("boom at build")


def _broken_call(fn):
    def call(*args):
        raise ValueError("boom at first call")

    return call


def test_failing_provider_and_setup_give_rows_not_a_crash(tmp_path):
    provs = [providers.Provider("eager", "-", providers._eager, compiled=False),
             providers.Provider("broken", "build", _broken_build),
             providers.Provider("broken", "call", _broken_call, compiled=False),
             providers.Provider("inductor", "reduce-overhead", providers._inductor_cudagraphs, cuda_only=True,
                                skip_note="CUDA only")]

    def bad_setup(device, n):
        raise KeyError("no such model")

    def skipped_setup(device, n):
        raise suites.SkipCase("optional dependency missing")

    cases = suites.smoke_cases(True) + [suites.Case("bad", (("n", 1),), bad_setup),
                                        suites.Case("skipped", (("n", 1),), skipped_setup)]
    csv_path = tmp_path / "r.csv"
    rows = harness.run_benchmarks(cases, provs, _cfg(), csv_path)
    assert _read(csv_path) == rows

    errors = [r for r in rows if r["status"] == "error"]
    notes = " ".join(r["note"] for r in errors)
    assert "boom at build" in notes and "boom at first call" in notes and "no such model" in notes
    mlp_errors = {(r["mode"], r["metric"]) for r in errors if r["model"] == "deep_mlp"}
    # Both phases were attempted for both broken providers, each failing in its first step.
    assert mlp_errors == {("build", "compile_forward"), ("build", "compile_forward_backward"),
                          ("call", "forward"), ("call", "forward_backward")}
    assert [r["metric"] for r in rows if r["model"] == "bad"] == ["setup"]
    assert [(r["metric"], r["status"]) for r in rows if r["model"] == "skipped"] == [("setup", "skipped")]
    skipped = [r for r in rows if r["model"] == "deep_mlp" and r["status"] == "skipped"]
    assert [(r["provider"], r["mode"]) for r in skipped] == [("inductor", "reduce-overhead")]
    # The healthy provider still measured both phases.
    ok = {r["metric"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    assert {"forward", "forward_backward", "max_rel_err", "max_rel_err_grad"} <= ok

    summary = tables.problems(rows)
    assert "Failures (5)" in summary and "Skipped (2)" in summary
    table = tables.tables(rows)
    assert "broken-build" in table and "compile_forward: error" in table


def _synthetic_rows(date: str, scale: float) -> list[dict[str, str]]:
    env = output.Env("cpu: test", torch.__version__, "0", "abc", date)
    rows = []
    for layers in (16, 32, 64):
        for width in (4, 8):
            case = suites.Case("deep_mlp", (("layers", layers), ("width", width), ("batch", 2)), suites.setup_deep_mlp)
            for prov, mode, t in (("eager", "-", 1.0), ("inductor", "default", 0.5), ("deeppcr", "parallel", 0.25)):
                rows.append(output.RowMaker(env, case, prov, mode)("forward", "ms", t * layers * scale))
    for steps in (25, 50):
        case = suites.Case("ddim_mlp", (("steps", steps), ("batch", 4)), suites.setup_ddim_mlp)
        for prov, mode in (("eager", "-"), ("deeppcr", "auto")):
            rows.append(output.RowMaker(env, case, prov, mode)("forward", "ms", steps * scale))
        rows.append(output.RowMaker(env, case, "deeppcr", "parallel")("forward", "", status="error", note="x"))
    return rows


def test_plots_read_only_the_csv_and_latest_run(tmp_path):
    csv_path = tmp_path / "results.csv"
    sink = output.CsvSink(csv_path)
    sink.write(_synthetic_rows("2026-01-01T00:00:00Z", 100.0))  # an older run appended before
    sink.write(_synthetic_rows("2026-01-02T00:00:00Z", 1.0))
    sink.close()
    rows = plots.read_csv(csv_path)
    latest = tables.latest_run(rows)
    assert len(latest) == len(rows) // 2 and {r["date"] for r in latest} == {"2026-01-02T00:00:00Z"}

    written = plots.plot_csv(csv_path, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["ddim_mlp_forward_time_batch_4_cpu.png", "deep_mlp_forward_speedup_batch_2_cpu.png"]
    assert all(p.stat().st_size > 1000 for p in written)

    table = tables.tables(latest)
    assert "4.00x" in table and "2.00x" in table  # deeppcr vs eager and vs inductor: 1/0.25, 0.5/0.25


def test_quantiles_error_and_timer_counts():
    assert timing.quantiles([3.0, 1.0, 2.0, 5.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))
    ref = [torch.tensor([1.0, -4.0]), torch.tensor([2.0])]
    assert measuring.max_rel_err([torch.tensor([1.0, -3.0]), torch.tensor([2.0])], ref) == pytest.approx(0.25)
    assert measuring.max_rel_err([None, torch.tensor([2.0])], ref) == pytest.approx(1.0)  # missing = zeros
    calls = []
    med, p20, p80 = timing.time_call(lambda: calls.append(1), torch.device("cpu"),
                                      _cfg(min_reps=3, max_reps=3, warmup=1, min_sample_s=0.0))
    assert len(calls) == 1 + 1 + 3 and p20 <= med <= p80  # warm-up, estimate, three samples


def test_providers_and_grids():
    labels = [p.label for p in providers.default_providers()]
    assert labels == ["eager", "inductor", "inductor-reduce-overhead", "deeppcr-parallel", "deeppcr-auto"]
    with pytest.raises(ValueError, match="unknown provider"):
        providers.select_providers(providers.default_providers(), "eager,nope")
    quick = suites.cases_for("all", quick=True)
    assert {c.model for c in quick} == {"deep_mlp", "residual_mlp", "conv_resnet", "ddim_mlp", "unet_ddim"}
    assert max(dict(c.params).get("layers", 0) for c in quick) <= 256
    full = suites.cases_for("mlp", quick=False)
    assert {dict(c.params)["layers"] for c in full} == {2**k for k in range(4, 13)}
    wl = quick[0].build(torch.device("cpu"))
    again = quick[0].build(torch.device("cpu"))
    assert torch.equal(wl.inputs[0], again.inputs[0]) and wl.trainable  # same inputs for every provider


def test_oracle_jacobian_approximations():
    """`sampler_rounds.approximate`: full rank is the exact Jacobian, rank K leaves a remainder of rank K,
    the shared subspace spans K directions; an unknown name is a clear error."""
    from benchmarks.sampler_rounds import approximate

    torch.manual_seed(0)
    J = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    tr = torch.diagonal(J, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(approximate(J, "exact"), J)
    torch.testing.assert_close(approximate(J, "trace+rank6"), J)
    torch.testing.assert_close(approximate(J, "trace"), tr)
    assert (torch.linalg.matrix_rank(approximate(J, "trace+rank2") - tr) == 2).all()
    assert torch.linalg.matrix_rank((approximate(J, "trace+shared3") - tr).reshape(-1, 6)) == 3
    torch.testing.assert_close(torch.diagonal(approximate(J, "diagonal"), dim1=-2, dim2=-1),
                               torch.diagonal(J, dim1=-2, dim2=-1))
    with pytest.raises(ValueError, match="unknown 'rank2'"):
        approximate(J, "rank2")
