"""End-to-end tests of backend="deeppcr": values and gradients against eager, structure of the graphs."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, call_targets, capture_graphs, run_both

import pcr_compile
from pcr_compile.backend import capturing_backend
from pcr_compile.models import DeepMLP, ResidualMLP
from pcr_compile.options import Options
from pcr_compile.runtime import ops


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
@pytest.mark.parametrize("layers,width,batch", [(24, 8, 5), (13, 3, 1)])
def test_mlp_chain_values_and_grads(activation, layers, width, batch):
    model = DeepMLP(layers=layers, width=width, activation=activation, gain=0.9)
    x = torch.randn(batch, width)
    y0, g0, y1, g1, solves = run_both(model, [x])
    assert rel_err(y1, y0) < 1e-5
    assert grads_rel_err(g1, g0) < 1e-4
    fwd = [s for s in solves if s.direction == "forward"]
    bwd = [s for s in solves if s.direction == "backward"]
    assert len(fwd) == 1 and len(bwd) == 1
    assert fwd[0].length == layers and fwd[0].converged and not fwd[0].fell_back
    assert bwd[0].converged and not bwd[0].fell_back


def test_prenorm_residual_chain_in_training_step():
    """A chain between a stem and a head, trained for a few optimizer steps: parameters follow eager's."""
    torch.manual_seed(1)
    ref = ResidualMLP(blocks=12, width=8, in_features=5, out_features=3)
    model = ResidualMLP(blocks=12, width=8, in_features=5, out_features=3)
    model.load_state_dict(ref.state_dict())
    opt0 = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt1 = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    x, target = torch.randn(6, 5), torch.randn(6, 3)
    with pcr_compile.record_solves() as solves:
        for _ in range(3):
            for opt, fn in ((opt0, ref), (opt1, compiled)):
                opt.zero_grad()
                loss = nn.functional.mse_loss(fn(x), target)
                loss.backward()
                opt.step()
    for p0, p1 in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5)
    assert {s.direction for s in solves} == {"forward", "backward"}
    assert all(s.length == 12 for s in solves)


def test_float64_gradcheck():
    model = DeepMLP(layers=10, width=3, activation="tanh", gain=0.8).double()
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compiled, (x,), eps=1e-6, atol=1e-6)
    y0, g0, y1, g1, _ = run_both(model, [x.detach()])
    assert rel_err(y1, y0) < 1e-9 and grads_rel_err(g1, g0) < 1e-8


def test_chain_op_in_aot_forward_and_backward_graphs():
    model = DeepMLP(layers=16, width=4)
    seen = capture_graphs(model, [torch.randn(3, 4)])
    [name] = seen["names"]
    name = name.replace("::", ".")  # str(OpOverload) spells the namespace with a dot
    fw, bw = call_targets(seen["forward"]), call_targets(seen["backward"])
    assert any(t.startswith(name) and not t.endswith("_adjoint.default") for t in fw), fw
    assert any(t == f"{name}_adjoint.default" for t in bw), bw
    # the chain's linear/tanh nodes are gone from the rewritten graph; the op replaced them
    assert not any("tanh" in t or "linear" in t for t in call_targets(seen["dynamo"]))


def test_model_without_repeats_is_left_to_inductor():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh())
    x = torch.randn(5, 4)
    seen = capture_graphs(model, [x])
    assert seen["names"] == [] and seen["plan"].chains == ()
    y_inductor = torch.compile(model)(x)
    torch._dynamo.reset()
    with pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    assert solves == []
    torch.testing.assert_close(y, y_inductor, rtol=0, atol=0)


class Expansive(nn.Module):
    """z <- tanh(8 W z): saturating, strongly expansive in the linear region; Newton overshoots."""

    def __init__(self, layers=40, width=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        for lin in self.layers:
            nn.init.normal_(lin.weight, std=8 / math.sqrt(width))

    def forward(self, x):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


def test_expansive_chain_falls_back_to_eager_answer():
    model = Expansive()
    x = torch.randn(4, 6)
    y0, g0, y1, g1, solves = run_both(model, [x], {**PARALLEL, "max_iters": 6})
    fwd = [s for s in solves if s.direction == "forward"][0]
    assert fwd.fell_back and not fwd.converged
    assert rel_err(y1, y0) < 1e-5
    assert grads_rel_err(g1, g0) < 1e-3


def test_nan_input_rows_match_eager():
    model = DeepMLP(layers=12, width=5, activation="relu")
    x = torch.randn(6, 5)
    x[2] = float("nan")
    x[4, 1] = float("inf")
    y0 = model(x)
    with pcr_compile.record_solves() as solves, torch.no_grad():
        y1 = torch.compile(model, backend="deeppcr", options=PARALLEL)(x)
    assert torch.equal(torch.isnan(y1), torch.isnan(y0))
    ok = ~torch.isnan(y0)
    torch.testing.assert_close(y1[ok], y0[ok], rtol=1e-5, atol=1e-6)
    assert solves[0].fell_back


def test_bfloat16_chain_iterates_in_float32():
    model = DeepMLP(layers=16, width=8, activation="tanh", gain=0.9)
    x = torch.randn(4, 8)
    ref64 = model.double()(x.double())
    model = model.bfloat16()
    y0 = model(x.bfloat16())
    with pcr_compile.record_solves() as solves:
        y1 = torch.compile(model, backend="deeppcr", options=PARALLEL)(x.bfloat16())
        y1.float().sum().backward()
    assert y1.dtype == torch.bfloat16
    assert rel_err(y1, y0) < 3e-2
    assert rel_err(y1, ref64) < 5e-2
    assert solves[0].converged
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_changed_batch_size_on_second_call():
    model = DeepMLP(layers=10, width=4)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    for batch in (3, 7, 2):
        x = torch.randn(batch, 4)
        with pcr_compile.record_solves() as solves:
            y = compiled(x)
        assert y.shape == (batch, 4)
        assert rel_err(y, model(x)) < 1e-5
        assert len(solves) == 1 and solves[0].length == 10


def test_sequential_mode_rewrites_nothing():
    model = DeepMLP(layers=12, width=4)
    x = torch.randn(3, 4)
    seen = capture_graphs(model, [x], {"mode": "sequential"})
    assert seen["names"] == [] and len(seen["plan"].chains) == 1
    assert seen["plan"].chains[0].decision.decision == "sequential"


def test_auto_mode_keeps_cpu_chains_sequential():
    report = pcr_compile.explain(DeepMLP(layers=12, width=4), torch.randn(3, 4))
    [chain] = report.chains
    assert chain.decision == "sequential" and "cpu" in chain.reason


@pytest.mark.parametrize("options,match", [
    ({"mdoe": "parallel"}, "unknown deeppcr option.*mdoe.*accepted options"),
    ({"mode": "fast"}, "'mode' must be one of .*auto.*parallel.*sequential"),
    ({"jacobian": "full"}, "'jacobian' must be one of"),
    ({"tol": -1.0}, "'tol' must be"),
    ({"max_iters": 2.5}, "'max_iters' must be an int"),
    ({"min_chain_length": 1}, "'min_chain_length' must be an int >= 2"),
    ({"strict": "yes"}, "'strict' must be a bool"),
    ({"inductor_mode": "fastest"}, "'inductor_mode' must be None or one of .*max-autotune"),
])
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        pcr_compile.Options.parse(options)
    compiled = torch.compile(DeepMLP(layers=8, width=2), backend="deeppcr", options=options)
    with pytest.raises(Exception, match=match) as info:
        compiled(torch.randn(1, 2))
    # Dynamo wraps backend errors in BackendCompilerFailed; the ValueError is its inner exception.
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


def test_internal_error_falls_back_to_inductor(monkeypatch, caplog):
    import pcr_compile.backend as backend

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(backend, "rewrite", boom)
    model = DeepMLP(layers=8, width=3)
    x = torch.randn(2, 3)
    with caplog.at_level("WARNING", logger="pcr_compile.backend"):
        y = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})(x)
    torch.testing.assert_close(y, model(x))
    assert "internal error" in caplog.text and "synthetic failure" in caplog.text
    torch._dynamo.reset()
    with pytest.raises(Exception, match="synthetic failure"):
        torch.compile(model, backend="deeppcr", options=PARALLEL)(x)


def test_a_failed_compile_of_the_rewritten_graph_falls_back_to_the_original(monkeypatch, caplog):
    """AOTAutograd traces the chain ops' forward and backward inside Inductor's compile: a failure there (as the
    backward's gradient structure for symbolic sizes once did) compiles the original graph instead of raising,
    unless strict."""
    import torch._inductor.compile_fx as inductor

    real = inductor.compile_fx

    def failing_on_chains(gm, *a, **k):
        if any(n.op == "call_function" and getattr(n.target, "namespace", None) == "pcr_compile"
               for n in gm.graph.nodes):
            raise RuntimeError("synthetic trace failure")
        return real(gm, *a, **k)

    monkeypatch.setattr(inductor, "compile_fx", failing_on_chains)
    model = nn.Sequential(DeepMLP(layers=8, width=3), nn.Linear(3, 1))  # a head: Inductor compiles the graph
    x = torch.randn(2, 3)
    with caplog.at_level("WARNING", logger="pcr_compile.backend"), pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})(x)
    torch.testing.assert_close(y, model(x))
    assert not solves and "rewritten graph failed" in caplog.text and "synthetic trace failure" in caplog.text
    torch._dynamo.reset()
    with pytest.raises(Exception, match="synthetic trace failure"):
        torch.compile(model, backend="deeppcr", options=PARALLEL)(x)


@pytest.mark.parametrize("how", ["torch.compile mode", "option"])
def test_inductor_mode_reaches_inductor(monkeypatch, how):
    """torch.compile's `mode` (or the `inductor_mode` option) becomes Inductor's config patches for the graph
    around the chain op, and the chain is still solved."""
    import torch._inductor.compile_fx as cfx
    from torch._inductor import list_mode_options

    seen = []
    real = cfx.compile_fx

    def spy(gm, example_inputs, *args, config_patches=None, **kwargs):
        seen.append((config_patches, call_targets(gm)))
        return real(gm, example_inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = DeepMLP(layers=10, width=4)
    x = torch.randn(3, 4)
    mode = "max-autotune-no-cudagraphs"
    if how == "option":
        kwargs = {"options": {**PARALLEL, "inductor_mode": mode}}
    else:
        kwargs = {"mode": mode}
    with pcr_compile.record_solves() as solves:
        y = torch.compile(model, backend="deeppcr", **kwargs)(x)
    assert rel_err(y, model(x)) < 1e-5
    patches, targets = seen[0]  # compile_fx re-enters itself inside the patches
    assert patches == list_mode_options(mode) and patches["max_autotune"]
    if how == "option":  # mode="parallel" solves the chain; torch.compile's mode alone keeps CPU's "auto"
        assert len(solves) == 1 and any(t.startswith("pcr_compile.chain_") for t in targets)


@pytest.mark.parametrize("mode,match", [("parallel", "deeppcr's own mode is an option.*options=.'mode': 'parallel'"),
                                        ("fastest", "must be one of Inductor's modes")])
def test_bad_torch_compile_mode_is_a_clear_error(mode, match):
    compiled = torch.compile(DeepMLP(layers=8, width=2), backend="deeppcr", mode=mode)
    with pytest.raises(Exception, match=match) as info:
        compiled(torch.randn(1, 2))
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_chain_ops_are_kept_out_of_cuda_graphs():
    """The solve picks its iteration count on the host; a CUDA graph would replay the recorded count."""
    seen = capture_graphs(DeepMLP(layers=10, width=4), [torch.randn(3, 4, requires_grad=True)])
    ops = [n.target for g in ("forward", "backward") for n in seen[g].graph.nodes
           if n.op == "call_function" and str(n.target).startswith("pcr_compile.chain_")]
    assert len(ops) == 2  # the chain op and its adjoint
    assert all(torch.Tag.cudagraph_unsafe in op.tags for op in ops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_mode_with_a_chain_follows_each_input():
    model = DeepMLP(layers=64, width=8).cuda()
    compiled = torch.compile(model, backend="deeppcr", options={**PARALLEL, "inductor_mode": "reduce-overhead"})
    for scale in (0.1, 1.0, 3.0, 0.1):  # different inputs need different iteration counts
        x = scale * torch.randn(16, 8, device="cuda")
        with torch.no_grad():
            assert rel_err(compiled(x), model(x)) < 1e-4


def test_entry_point_registers_backend():
    from importlib.metadata import entry_points

    eps = entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "deeppcr" and ep.value == "pcr_compile.backend:deeppcr" for ep in eps)
    assert "deeppcr" in torch._dynamo.list_backends()


def test_dynamic_batch_size_keeps_symbolic_sizes_in_the_chain():
    """Under dynamic shapes a step that reads x.shape[0] refers to a SymInt: it is passed to the op as an int."""
    from pcr_compile.models import DDIMSampler, MLPDenoiser

    model = DDIMSampler(MLPDenoiser(hidden=16), steps=9)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL, dynamic=True)
    for batch in (4, 7):
        x = torch.randn(batch, 2)
        with torch.no_grad(), pcr_compile.record_solves() as solves:
            y = compiled(x)
            assert rel_err(y, model(x)) < 1e-4
        assert len(solves) == 1 and solves[0].length == 9


def test_auto_switches_a_chain_that_does_not_pay_to_sequential_after_its_first_solve(monkeypatch):
    """mode="auto" (here made to pick "parallel" as it would on a GPU): a Picard solve that needs about L
    iterations is switched to sequential evaluation for later calls with the same shapes, forward and
    backward; record_solves and explain say so and why."""
    import pcr_compile.backend as backend
    from pcr_compile import solver
    from pcr_compile.cost import Decision

    monkeypatch.setattr(backend, "decide", lambda m, o, d: Decision("parallel", "identity", "auto (as on cuda)"))
    model = DeepMLP(layers=12, width=4, gain=3.0)  # expansive: Picard needs about L iterations
    x = torch.randn(3, 4)
    compiled = torch.compile(model, backend="deeppcr", options={"mode": "auto", "strict": True})
    with pcr_compile.record_solves() as first:
        compiled(x).pow(2).mean().backward()
    fwd = first[0]
    assert fwd.jacobian == "identity" and fwd.iterations > solver.SWITCH_FRACTION * 12
    with pcr_compile.record_solves() as later:
        y = compiled(x)
        y.pow(2).mean().backward()
    assert [(r.direction, r.jacobian) for r in later] == [("forward", "sequential"), ("backward", "sequential")]
    assert all(r.reason.startswith("auto: the first") and not r.fell_back for r in later)
    torch.testing.assert_close(y, model(x))
    assert solver.switched(fwd.chain.removeprefix("pcr_compile::"))
    report = pcr_compile.explain(model, x, options={"mode": "auto"})
    assert "switched to sequential" in report.chains[0].reason


def test_a_backend_that_changes_nothing_copies_nothing(monkeypatch):
    """Default options on the CPU keep every chain sequential: the graph is analysed where it is (read only)
    and handed to Inductor itself, without the copy a rewrite needs (half the backend's own time)."""
    import pcr_compile.backend as backend
    from pcr_compile.options import Options

    copies = []
    real = backend.copy_graph_module
    monkeypatch.setattr(backend, "copy_graph_module", lambda gm: copies.append(gm) or real(gm))
    [gm] = torch._dynamo.explain(DeepMLP(layers=10, width=3))(torch.randn(2, 3)).graphs
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    new, plan, names = backend.rewrite(gm, Options())
    assert new is gm and not names and not copies and len(plan.chains) == 1
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before
    new, plan, names = backend.rewrite(gm, Options(mode="parallel"))  # a rewrite works on a copy
    assert new is not gm and names and len(copies) == 1
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


class ScaledResidual(nn.Module):
    """Residual tanh steps scaled by a float attribute, with an op after the chain (so the graph goes
    through AOTAutograd and Inductor)."""

    def __init__(self, scale: float, layers: int = 10):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))
        self.scale = scale

    def forward(self, x):
        for lin in self.lins:
            x = x + self.scale * torch.tanh(lin(x))
        return x.sin()


def test_dynamo_restarts_pass_through_the_fallback(caplog):
    """A second instance with another float attribute makes AOTAutograd ask Dynamo to trace the frame again
    (TensorifyScalarRestartAnalysis): a signal, not a failure. The fallback took it for one, compiled the
    original graph with Inductor and the chain was never solved."""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    for scale in (0.3, 1.0):
        model = ScaledResidual(scale)
        with torch.no_grad(), pcr_compile.record_solves() as solves:
            y = torch.compile(model, backend="deeppcr", options={"mode": "parallel"})(x)
        assert len(solves) == 1, f"scale={scale}: the chain was not solved"
        assert rel_err(y, model(x)) < 1e-5
    assert "compiling the rewritten graph failed" not in caplog.text


class _GradBlocks(nn.Module):
    """A chain in an enable_grad block (an energy model's inner loop) beside one in a no_grad block."""

    def __init__(self):
        super().__init__()
        self.a, self.b = DeepMLP(layers=9, width=4), DeepMLP(layers=9, width=4)

    def forward(self, x):
        with torch.enable_grad():
            y = self.a(x)
        with torch.no_grad():
            z = self.b(x)
        return y, z


def test_grad_mode_blocks_inside_the_compiled_code_decide_the_trajectory():
    """Whether a chain keeps its trajectory for backward is read at its place in the graph: an enable_grad block
    compiled under no_grad was rewritten without it, and Inductor's compile failed on the op's backward (a
    warning, then the original graph; strict raised). The enable_grad chain trains with eager's gradients; the
    no_grad one keeps no trajectory."""
    torch.manual_seed(0)
    model = _GradBlocks()
    x = torch.randn(3, 4)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    params = list(model.a.parameters())
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y, z = compiled(x)
    assert y.requires_grad and not z.requires_grad and [s.direction for s in solves] == ["forward", "forward"]
    g = torch.autograd.grad(y.pow(2).sum(), params)
    y0, z0 = model(x)
    g0 = torch.autograd.grad(y0.pow(2).sum(), params)
    torch.testing.assert_close((y, z), (y0, z0), rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    graphs: list[dict] = []
    torch._dynamo.reset()
    torch.compile(model, backend=capturing_backend(Options.parse(PARALLEL), graphs))(x)
    calls = [n for g in graphs for n in g["dynamo"].graph.nodes if "pcr_compile.chain_" in str(n.target)]
    saves = [ops.ChainArgs(*n.args).save_trajectory for n in calls]
    assert sorted(saves) == [False, True]


@pytest.mark.parametrize("context", ["save_on_cpu", "checkpoint"])
def test_saved_tensor_hooks_around_the_call_keep_the_parallel_solve(context):
    """Saved-tensor hooks open around a compiled call (`save_on_cpu()`, non-reentrant checkpoint of a compiled
    model) made every torch.func call of the solve raise, and each solve fell back to sequential evaluation with
    a warning. They are set aside for the solve and put back: the solve runs in parallel, the hooks still see
    the graph's own saved tensors, and the values and gradients are eager's."""
    torch.manual_seed(0)
    model = DeepMLP(layers=10, width=4)
    x = torch.randn(3, 4, requires_grad=True)
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    params = [*model.parameters(), x]
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with pcr_compile.record_solves() as solves:
        if context == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = compiled(x)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = torch.utils.checkpoint.checkpoint(compiled, x, use_reentrant=False)
        g = torch.autograd.grad(y.pow(2).sum(), params)
    assert solves and not any(s.fell_back for s in solves) and "backward" in [s.direction for s in solves]
    assert packed or context == "checkpoint"  # checkpoint's own hooks are innermost: they take the saves
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None  # all popped again on exit
    y0 = model(x)
    g0 = torch.autograd.grad(y0.pow(2).sum(), params)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_unknown_process_group_is_an_error_whether_or_not_a_chain_is_rewritten():
    """A process_group name never registered was an error only when a chain was rewritten: with mode "auto" on
    the CPU (nothing rewritten) or a model without chains it was accepted silently."""
    for options, model in (({"process_group": "bogus"}, DeepMLP(layers=9, width=4)),
                           ({"mode": "parallel", "process_group": "bogus"}, nn.Linear(4, 4))):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="option 'process_group' must be 'world' or a name registered") as e:
            torch.compile(model, backend="deeppcr", options=options)(torch.randn(2, 4))
        assert isinstance(e.value.__cause__ or e.value, ValueError) or "ValueError" in str(e.value)
