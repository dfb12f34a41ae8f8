"""Public API: explain() reports and record_solves() records."""

import json
import threading

import pytest
import torch
from cli_target_model import make_with_kwargs

import pcr_compile
from pcr_compile.backend import capturing_backend
from pcr_compile.models import DDIMSampler, DeepMLP, MLPDenoiser
from pcr_compile.options import Options
from pcr_compile.reports import chain_report


def test_explain_report_fields_and_table():
    report = pcr_compile.explain(DeepMLP(layers=12, width=4), torch.randn(3, 4), options={"mode": "parallel"})
    [c] = report.chains
    assert (c.length, c.kind, c.decision, c.jacobian) == (12, "layers", "parallel", "dense")
    assert c.state_shape == (3, 4) and c.reason
    assert report.declined == [] and len(report.graphs) == 1 and report.graph_breaks == []
    text = str(report)
    assert "Chains:" in text and "decision" in text and "parallel" in text
    doc = json.loads(report.to_json())
    assert doc["schema_version"] == 1 and doc["chains"][0]["length"] == 12
    assert doc["options"]["mode"] == "parallel"


def test_explain_reports_sampler_kind_and_graph_breaks():
    report = pcr_compile.explain(DDIMSampler(MLPDenoiser(), steps=9), torch.randn(2, 2))
    [c] = report.chains
    assert c.kind == "sampler" and c.length == 9 and c.lifted_constants >= 1

    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x + 1
            print("graph break")
            return x * 2

    report = pcr_compile.explain(Breaks(), torch.randn(2))
    assert len(report.graph_breaks) == 1 and len(report.graphs) == 2 and report.chains == []
    assert report.skipped_frames == []


class BreakInTheLoop(torch.nn.Module):
    """A graph break inside the loop over the layers: torch 2.13's Dynamo skips the whole frame ("graph breaks in
    loops are not supported") and runs it eagerly, leaving no graph and no break reason in its explain output."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(12))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if i == 5:
                torch._dynamo.graph_break()
        return x


def test_explain_names_a_frame_dynamo_ran_eagerly():
    """explain reported "Graphs: 0   Graph breaks: 0 ... no chains found" for this model, and nothing else:
    nothing said why nothing was compiled. The report now carries Dynamo's message (to_dict too), and `pcr-compile
    inspect`'s summary and note name it."""
    from pcr_compile.inspection import Target, analyse, render_summary

    model, x = BreakInTheLoop(), torch.randn(2, 4)
    report = pcr_compile.explain(model, x)
    if report.graphs:
        pytest.skip("this torch's Dynamo compiles around a graph break inside a loop")
    assert report.chains == [] and report.graph_breaks == []
    [message] = report.skipped_frames
    assert "graph break in loop" in message and "graph_break()" in message
    assert "run eagerly, not compiled: Call to `torch._dynamo.graph_break()`" in str(report)
    assert json.loads(report.to_json())["skipped_frames"] == [message]
    summary = render_summary(analyse(Target("m", "BreakInTheLoop", model, (x,)), Options.parse(None)))
    assert "Frames Run Eagerly (not compiled):" in summary and "graph break in loop" in summary
    assert "Dynamo captured no graph and ran the call eagerly" in summary


def test_record_solves_collects_per_block_and_thread():
    model = DeepMLP(layers=9, width=3)
    compiled = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})
    x = torch.randn(2, 3)
    with pcr_compile.record_solves() as outer:
        with pcr_compile.record_solves() as inner:
            compiled(x).sum().backward()
        compiled(x)
    assert [r.direction for r in inner] == ["forward", "backward"]
    assert [r.direction for r in outer] == ["forward", "backward", "forward"]
    r = inner[0]
    assert r.chain.startswith("chain_") and r.length == 9 and r.converged and not r.fell_back
    assert r.iterations == len(r.residuals) - 1 and r.residual == r.residuals[-1]

    seen = []

    def other_thread():
        with pcr_compile.record_solves() as mine:
            pass
        seen.append(mine)

    with pcr_compile.record_solves() as here:
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert here == [] and seen == [[]]
    compiled(x)  # outside any block: nothing is recorded, nothing fails


def test_record_solves_collects_a_backward_run_in_another_thread():
    model = DeepMLP(layers=10, width=4)
    x = torch.randn(2, 4)
    compiled = torch.compile(model, backend="deeppcr", options={"mode": "parallel", "strict": True})
    y = compiled(x)  # forward outside the block: not recorded
    errors = []

    def backward():
        try:
            y.pow(2).sum().backward()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with pcr_compile.record_solves() as solves:
        t = threading.Thread(target=backward)
        t.start()
        t.join()
    assert not errors
    assert [s.direction for s in solves] == ["backward"]
    assert all(p.grad is not None for p in model.parameters())


def test_explain_with_keyword_inputs_reports_the_compiled_graph():
    """HF models take attention_mask=, use_cache=False: explain must trace the graph the compiled call sees."""
    model, args, kwargs = make_with_kwargs()
    options = {"mode": "parallel"}
    report = pcr_compile.explain(model, *args, options=options, **kwargs)
    graphs: list[dict] = []
    torch.compile(model, backend=capturing_backend(Options.parse(options), graphs))(*args, **kwargs)
    compiled = [chain_report(e["graph"], pc) for e in graphs for pc in e["plan"].chains]
    assert report.chains == compiled
    [c] = report.chains
    assert (c.length, c.nodes_per_step, c.exposed_values) == (9, 3, 0)  # linear, tanh, mul by the mask
    # without them, the report is on another graph: no mask, every layer's output returned
    [other] = pcr_compile.explain(model, *args, options=options).chains
    assert (other.nodes_per_step, other.exposed_values) == (2, 8)


def test_explain_of_something_not_callable_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="explain: model must be callable .* got int"):
        pcr_compile.explain(3, torch.randn(2))
