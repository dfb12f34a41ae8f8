"""Tests of `pcr-compile inspect` (pcr_compile/cli.py, pcr_compile/inspection/).

The expensive invocations run once, as subprocesses started together (module fixture), and several tests read
each one's output: the human report, --graphs/--aot markers, --run --backward solves, --plot, --dump-dir, --json,
a file TARGET through the installed `pcr-compile` script and a module TARGET through PYTHONPATH. Error paths and
help run in-process through `cli.main`, except two that check stderr of a real process (with and without
--verbose).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcr_compile import cli
from pcr_compile.inspection import JSON_SCHEMA
from pcr_compile.options import Options

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = "tests/cli_target_model.py"
PARALLEL = '{"mode": "parallel"}'
SCRIPT = shutil.which("pcr-compile", path=str(Path(sys.executable).parent)) or shutil.which("pcr-compile")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every subprocess at once (they mostly wait on imports and Dynamo), then collect them."""
    tmp = tmp_path_factory.mktemp("cli")
    py = [sys.executable, "-m", "pcr_compile.cli", "inspect"]
    assert SCRIPT, "the pcr-compile console script is not installed (pip install -e .)"
    specs = {
        "mlp": (py + ["mlp", "--layers", "8", "--options", PARALLEL, "--graphs", "--aot", "--run", "--backward",
                      "--plot", str(tmp / "res.png"), "--dump-dir", str(tmp / "dump")], {}),
        "ddim": (py + ["ddim", "--steps", "8", "--batch", "3", "--options", PARALLEL, "--run", "--json"], {}),
        "file": ([SCRIPT, "inspect", f"{MODEL_FILE}:make", "--graphs"], {}),
        "module": (py + ["cli_target_model:make", "--options", PARALLEL, "--json"],
                   {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}),
        "badopt": (py + ["mlp", "--options", '{"mdoe": "parallel"}'], {}),
        "badopt_verbose": (py + ["mlp", "--options", '{"mdoe": "parallel"}', "--verbose"], {}),
    }
    procs = {k: subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for k, (cmd, env) in specs.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = (p.returncode, stdout, stderr)
    return out, tmp


def ok(runs, key) -> str:
    rc, stdout, stderr = runs[0][key]
    assert rc == 0, f"{key}: exit {rc}\n{stderr[-3000:]}"
    return stdout


def section(text: str, title: str) -> str:
    """The lines under the `=== ... title ... ===` header, up to the next header."""
    m = re.search(r"^=== [^\n]*" + re.escape(title) + r"[^\n]*===\n(.*?)(?=^=== |\Z)", text, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def marked(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(">> ")]


# --- the human report ---------------------------------------------------------------------------------------


def test_summary_and_chain_table(runs):
    out = ok(runs, "mlp")
    assert "Target: mlp: DeepMLP: 8 x (Linear(8, 8) + tanh)" in out
    for line in ["Graph Count: 1", "Graph Break Count: 0", "Op Count: 16", "Chain Count: 1 (1 parallel, 0 sequential)"]:
        assert line in out.splitlines()
    assert "Graph 0: 34 nodes; linear x8, tanh x8" in out
    table = out.split("Graph 0: chains\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split()[:11] == ["graph", "first", "last", "steps", "nodes/step", "kind", "state", "per-step",
                                     "in", "jacobian", "decision"]
    row = table[2].split()
    assert row[:10] == ["0", "input_1", "input_16", "8", "2", "layers", "4x8", "2", "dense", "parallel"]
    assert "mode='parallel'" in table[2]
    assert "Graph 0: declined candidates\nno candidates declined" in out


def test_graphs_before_and_after_rewrite(runs):
    out = ok(runs, "mlp")
    before = section(out, "FX graph before the rewrite")
    after = section(out, "FX graph after the rewrite")
    assert not marked(before) and before.count("torch.tanh(") == 8
    assert "torch.tanh(" not in after
    [line] = marked(after)
    assert "torch.ops.pcr_compile.chain_" in line
    assert re.search(r"after the rewrite; chain ops \(marked >>\): pcr_compile::chain_[0-9a-f]+ ===", out)


def test_aot_graphs_mark_chain_op_and_adjoint(runs):
    out = ok(runs, "mlp")
    [fw] = marked(section(out, "AOTAutograd forward graph"))
    [bw] = marked(section(out, "AOTAutograd backward graph"))
    op = re.search(r"torch\.ops\.pcr_compile\.(chain_[0-9a-f]+)\.default\(", fw).group(1)
    assert f"torch.ops.pcr_compile.{op}_adjoint.default(" in bw


def test_run_backward_solve_lines(runs):
    out = ok(runs, "mlp")
    run = section(out, "Run: torch.compile")
    assert "forward and backward ===" in out
    errs = re.search(r"max rel error ([0-9.e+-]+); gradients: max rel error ([0-9.e+-]+)", run)
    assert errs and float(errs.group(1)) < 1e-5 and float(errs.group(2)) < 1e-4
    assert "solves: 2" in run
    rows = {ln.split()[1]: ln.split() for ln in run.splitlines() if re.match(r"\s*\d+\s+(forward|backward)\s", ln)}
    assert set(rows) == {"forward", "backward"}
    fwd = rows["forward"]  # solve direction chain steps jacobian iterations residual converged fell-back
    assert fwd[3] == "8" and fwd[4] == "dense" and fwd[7] == "yes" and fwd[8] == "no"
    iters, residual = int(fwd[5]), float(fwd[6])
    assert 1 <= iters <= 8 and residual < 1e-5
    line = re.search(r"^  solve 0 \(forward\): (.*)$", run, re.M).group(1)
    per_iter = re.findall(r"(\d+): (\S+)", line)
    assert [int(k) for k, _ in per_iter] == list(range(iters + 1))
    assert float(per_iter[-1][1]) == pytest.approx(residual, rel=0.01)
    assert float(per_iter[0][1]) > residual
    assert re.search(r"^  solve 1 \(backward\): 0: ", run, re.M)


def test_plot_writes_png(runs):
    ok(runs, "mlp")
    png = runs[1] / "res.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_dump_dir_stages(runs):
    out = ok(runs, "mlp")
    d = runs[1] / "dump"
    assert f"stages written to {d}" in out
    assert {p.name for p in d.iterdir()} == {
        "summary.txt", "chains.json", "inspect.json", "graph_0_before.txt", "graph_0_after.txt", "aot_forward.txt",
        "aot_backward.txt", "solves.json", "solves.txt"}
    assert (d / "summary.txt").read_text() in out
    chains = json.loads((d / "chains.json").read_text())
    assert chains["schema_version"] == 1 and [c["length"] for c in chains["chains"]] == [8]
    assert len(marked((d / "graph_0_after.txt").read_text())) == 1
    assert not marked((d / "graph_0_before.txt").read_text())
    assert "_adjoint.default(" in marked((d / "aot_backward.txt").read_text())[0]
    solves = json.loads((d / "solves.json").read_text())["solves"]
    assert [s["direction"] for s in solves] == ["forward", "backward"]
    doc = json.loads((d / "inspect.json").read_text())
    assert doc["rewrite"][0]["before"] and doc["rewrite"][0]["after"]  # the files hold the graphs, --graphs or not


def test_file_target_through_installed_script_auto_mode(runs):
    out = ok(runs, "file")
    assert f"Target: {MODEL_FILE}:make: TwoStacks" in out
    assert "Graph Count: 2" in out and "Graph Break Count: 1" in out
    assert "Break Reason 1: Call to `torch._dynamo.graph_break()`" in out
    assert re.search(r"at \S*cli_target_model\.py:\d+ in forward", out)
    assert "Chain Count: 2 (0 parallel, 2 sequential)" in out
    assert "Note: nothing rewritten: mode='auto' keeps chains sequential on cpu" in out
    for g in (0, 1):
        row = out.split(f"Graph {g}: chains\n", 1)[1].splitlines()[2].split()
        assert row[3] == "9" and row[9] == "sequential" and "auto on cpu" in " ".join(row[10:])
        assert f"=== Graph {g}: FX graph after the rewrite; unchanged: nothing rewritten ===" in out
    assert not marked(out)


# --- JSON -----------------------------------------------------------------------------------------------------


def _strict(text: str) -> dict:
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def test_json_schema(runs):
    doc = _strict(ok(runs, "ddim"))
    assert doc["schema_version"] == 1 and doc["tool"] == "pcr-compile inspect"
    assert isinstance(doc["torch_version"], str)
    assert doc["target"]["spec"] == "ddim" and doc["target"]["inputs"] == [{"shape": [3, 2], "dtype": "float32"}]
    assert doc["options"]["mode"] == "parallel" and doc["options"]["max_iters"] == 50
    rep = doc["report"]
    assert rep["schema_version"] == 1 and rep["graph_count"] == 1 and rep["graph_break_count"] == 0
    assert doc["graph_break_locations"] == [] and rep["graph_breaks"] == []
    assert isinstance(rep["graphs"][0]["nodes"], int) and rep["graphs"][0]["ops"]["linear"] == 24
    [c] = rep["chains"]
    types = {"graph": int, "first": str, "last": str, "length": int, "nodes_per_step": int, "kind": str,
             "state_shape": list, "state_shapes": list, "per_step_inputs": int, "lifted_constants": int,
             "invariant_inputs": int, "jacobian": str, "decision": str, "reason": str, "exposed_values": int,
             "autocast": str}
    assert set(c) == set(types) and all(isinstance(c[k], t) for k, t in types.items())
    assert (c["length"], c["kind"], c["decision"], c["state_shape"]) == (8, "sampler", "parallel", [3, 2])
    assert c["lifted_constants"] > 0
    [rw] = doc["rewrite"]
    assert rw["rewritten"] and re.fullmatch(r"pcr_compile::chain_[0-9a-f]+", rw["chain_ops"][0])
    assert rw["before"] is None and rw["after"] is None and rw["error"] is None  # no --graphs
    assert doc["note"] is None and doc["aot"] is None
    run = doc["run"]
    assert run["backward"] is False and run["grad_max_rel_error"] is None
    assert run["outputs"] == [{"shape": [3, 2], "dtype": "float32"}] and run["max_rel_error"] < 1e-5
    [s] = run["solves"]
    assert set(s) == {"chain", "length", "iterations", "residual", "converged", "fell_back", "direction",
                      "jacobian", "prefix", "residuals", "reason", "seconds", "evaluations", "sequential_steps",
                      "chosen", "step_evaluations"}
    assert (s["direction"], s["length"], s["converged"], s["fell_back"]) == ("forward", 8, True, False)
    assert s["evaluations"] == s["iterations"] + 1 and s["sequential_steps"] == 0  # the last one certifies
    assert len(s["residuals"]) == s["iterations"] + 1 and s["residuals"][-1] == s["residual"]
    assert isinstance(s["seconds"], float)


def test_json_keys_match_documented_schema(runs):
    doc = _strict(ok(runs, "ddim"))
    documented = re.findall(r'^  "(\w+)":', JSON_SCHEMA, re.M)
    assert documented == list(doc)
    run_keys = re.search(r'"run": null \| \{(.*?)"solves"', JSON_SCHEMA, re.S).group(1)
    assert set(re.findall(r'"(\w+)":', run_keys)) - {"shape", "dtype"} | {"solves"} == set(doc["run"])


def test_module_target_with_pythonpath(runs):
    doc = _strict(ok(runs, "module"))
    assert doc["target"]["spec"] == "cli_target_model:make"
    rep = doc["report"]
    assert rep["graph_count"] == 2 and rep["graph_break_count"] == 1
    assert "graph_break()" in rep["graph_breaks"][0]
    assert "cli_target_model.py" in doc["graph_break_locations"][0]
    assert [(c["graph"], c["length"], c["decision"]) for c in rep["chains"]] == [(0, 9, "parallel"), (1, 9, "parallel")]
    assert [r["rewritten"] for r in doc["rewrite"]] == [True, True]


# --- errors and help ----------------------------------------------------------------------------------------


def test_bad_options_in_a_real_process(runs):
    rc, stdout, stderr = runs[0]["badopt"]
    assert rc == 2 and stdout == ""
    accepted = sorted(f.name for f in dataclasses.fields(Options))
    assert stderr.splitlines() == [
        f"pcr-compile: error: options: unknown deeppcr option(s) ['mdoe']; accepted options: {accepted}"]
    rc, _, stderr = runs[0]["badopt_verbose"]
    assert rc == 2 and "Traceback" in stderr and stderr.rstrip().splitlines()[-1].startswith("pcr-compile: error:")


def run_main(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv,message", [
    (["mlp", "--options", '{"mode": '], "options: not valid JSON (Expecting value: line 1 column 10"),
    (["mlp", "--options", "[1]"], "options: expected a JSON object"),
    (["mlp", "--options", '{"mode": "fast"}'], "options: deeppcr option 'mode' must be one of"),
    (["mlp", "--options", '{"tol": 2}'], "options: deeppcr option 'tol' must be None or a number in (0, 1), got 2"),
    (["banana"], "'banana' is neither a built-in example (ddim, mlp, resmlp, resnet) nor"),
    (["no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    (["tests/missing_model.py:make"], "tests/missing_model.py: no such file"),
    ([f"{MODEL_FILE}:nope"], f"{MODEL_FILE} has no attribute 'nope'"),
    ([f"{MODEL_FILE}:not_callable"], "not_callable is not callable"),
    ([f"{MODEL_FILE}:not_a_pair"], "not_a_pair() returned a TwoStacks; expected (model, example_inputs)"),
    ([f"{MODEL_FILE}:bad_inputs"], "bad_inputs() returned example_inputs a tuple of 1 (str); expected"),
    ([f"{MODEL_FILE}:bad_kwargs"], "bad_kwargs() returned example_kwargs a list of 2 (str, str); expected"),
    ([f"{MODEL_FILE}:raises"], "raises() raised RuntimeError: no weights here"),
    (["mlp", "--steps", "3"], "--steps does not apply to 'mlp' (it takes --layers, --width, --batch)"),
    (["ddim", "--layers", "3"], "--layers does not apply to 'ddim'"),
    ([f"{MODEL_FILE}:make", "--layers", "3"], "--layers apply to the built-in examples only"),
    (["mlp", "--layers", "0"], "--layers must be >= 1"),
    (["mlp", "--backward"], "--backward needs --run"),
])
def test_usage_errors_exit_2_with_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    status, out, err = run_main(capsys, "inspect", *argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("pcr-compile: error: ") and message in err, err
    assert "Traceback" not in err


def test_target_with_keyword_inputs(capsys, monkeypatch):
    """A TARGET returning (model, example_inputs, example_kwargs): the keyword inputs reach the traced graph."""
    monkeypatch.chdir(ROOT)
    status, out, _ = run_main(capsys, "inspect", f"{MODEL_FILE}:make_with_kwargs", "--options", PARALLEL, "--json")
    assert status == 0
    doc = _strict(out)
    assert doc["target"]["kwargs"] == {"mask": {"shape": [3, 6], "dtype": "float32"}, "collect": {"value": "False"}}
    [c] = doc["report"]["chains"]
    assert (c["length"], c["nodes_per_step"], c["exposed_values"]) == (9, 3, 0)  # the mask's multiply is in it
    status, out, _ = run_main(capsys, "inspect", f"{MODEL_FILE}:make_with_kwargs")
    assert status == 0 and "Inputs: float32[3, 6], mask=float32[3, 6], collect=False\n" in out


def test_model_failure_exits_1(capsys, monkeypatch):
    import torch

    def make():
        return torch.nn.Linear(2, 2), (torch.randn(3, 5),)  # shape mismatch at run time

    monkeypatch.setattr(sys.modules[__name__], "broken_make", make, raising=False)
    status, out, err = run_main(capsys, "inspect", f"{__name__}:broken_make")
    assert status == 1 and out == ""
    assert err.startswith("pcr-compile: error: tracing the model (torch._dynamo.explain) failed: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_help(capsys):
    status, out, err = run_main(capsys)  # no command: the help, on stderr, status 2
    assert status == 2 and out == "" and "inspect" in err and "exit status" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "{inspect}" not in (top := capsys.readouterr().out) and "COMMAND" in top
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ["--layers", "--width", "--batch", "--steps", "--options", "--graphs", "--aot", "--run",
                 "--backward", "--plot", "--json", "--dump-dir", "--verbose"]:
        assert flag in text
    assert '"schema_version": 1' in text and "exit status" in text and "mlp" in text and "ddim" in text


def test_builtin_resnet_and_resmlp(capsys):
    for name in ("resnet", "resmlp"):
        status, out, _ = run_main(capsys, "inspect", name, "--layers", "8", "--batch", "2", "--json")
        assert status == 0
        [c] = _strict(out)["report"]["chains"]
        assert c["length"] == 8 and c["kind"] == "layers" and c["decision"] == "sequential"
        assert "auto on cpu" in c["reason"]
