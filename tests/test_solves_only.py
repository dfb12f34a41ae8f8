"""A graph that is its chain ops alone runs as it is: no AOTAutograd, no Inductor (issue 12's host overhead).

With grad mode off it calls the ops' implementations directly (no custom-op dispatch); with grad on it calls
the ops, whose registered autograd gives the adjoint. Anything else in the graph goes to Inductor as before."""

import pytest
import torch
import torch.nn as nn

from pcr_compile.models import DeepMLP, StackedMLP

OPTS = {"mode": "parallel", "strict": True}


def _dispatched(fn) -> list[str]:
    """Names of the ops the dispatcher ran during `fn()` (the profiler records every dispatched op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


@pytest.fixture
def inductor_calls(monkeypatch):
    import torch._inductor.compile_fx as cfx

    calls = []
    real = cfx.compile_fx

    def counting(gm, inputs, **kw):
        calls.append(gm)
        return real(gm, inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", counting)
    return calls


@pytest.mark.parametrize("model_cls", [DeepMLP, StackedMLP])
def test_chain_only_graph_skips_inductor_and_trains_like_eager(model_cls, inductor_calls):
    torch.manual_seed(0)
    model = model_cls(12, 6, gain=0.8).double()
    fast = torch.compile(model, backend="deeppcr", options=OPTS)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = fast(x)
    out.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()], x.grad.clone()
    model.zero_grad(), x.grad.zero_()
    model(x).square().sum().backward()
    assert inductor_calls == []
    torch.testing.assert_close(out, model(x))
    for g, p in zip(got[0], model.parameters()):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(got[1], x.grad)


def test_no_grad_graph_calls_the_implementations_directly(inductor_calls):
    torch.manual_seed(0)
    model = StackedMLP(12, 6, gain=0.8).double()
    fast = torch.compile(model, backend="deeppcr", options=OPTS)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        fast(x)
        seen = _dispatched(lambda: fast(x))
        torch.testing.assert_close(fast(x), model(x))
    assert "aten::addmm" in seen and not any(n.startswith("pcr_compile::") for n in seen), seen
    fast(x)  # grad mode on: a recompile, and the op itself (its autograd) is called
    seen = _dispatched(lambda: fast(x))
    assert any(n.startswith("pcr_compile::chain") for n in seen), seen
    assert inductor_calls == []


class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DeepMLP(12, 6, gain=0.8)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x)).relu()


def test_graph_with_other_work_still_goes_to_inductor(inductor_calls):
    from pcr_compile.backend import solves_only

    torch.manual_seed(0)
    model = _WithHead().double()
    fast = torch.compile(model, backend="deeppcr", options=OPTS)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(fast(x), model(x))
    assert inductor_calls  # (compile_fx calls itself once more when it patches its config)
    assert not solves_only(inductor_calls[0])
    assert any(getattr(n.target, "namespace", None) == "pcr_compile" for n in inductor_calls[0].graph.nodes)


def test_inductor_mode_keeps_inductor(inductor_calls):
    model = DeepMLP(12, 6, gain=0.8).double()
    fast = torch.compile(model, backend="deeppcr", options={**OPTS, "inductor_mode": "max-autotune-no-cudagraphs"})
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(fast(x), model(x))
    assert inductor_calls  # (compile_fx calls itself once more when it patches its config)


def test_double_backward_is_a_clear_error_and_first_order_gradients_stay_right():
    """create_graph=True gives eager's gradient; differentiating that gradient again (the adjoint op has no
    derivative) raises an error that names the double backward, never a wrong second derivative."""
    torch.manual_seed(0)
    model = DeepMLP(10, 4, gain=0.8).double()
    fast = torch.compile(model, backend="deeppcr", options=OPTS)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    (g0,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, g0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.square().sum(), x)
