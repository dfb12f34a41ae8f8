"""passes/scan.py: `torch.ops.higher_order.scan` nodes become their steps in the backend's copy of the graph."""

import torch
from helpers import PARALLEL
from torch._higher_order_ops.scan import scan

import pcr_compile


def _tanh_step(x, wb):
    w, b = wb
    return torch.tanh(x @ w.T + b), torch.empty(0)


def _data(L=12, w=5, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(3, w, dtype=dtype), torch.randn(L, w, w, dtype=dtype) * 0.9 / w ** 0.5,
            torch.randn(L, w, dtype=dtype) * 0.1)


def _sequential(x, W, b):
    for i in range(W.shape[0]):
        x = torch.tanh(x @ W[i].T + b[i])
    return x


def test_a_scan_is_one_chain_over_the_scanned_tensors():
    x, W, b = _data()

    def f(x, W, b):
        return scan(_tanh_step, x, (W, b))[0]

    [c] = pcr_compile.explain(f, x, W, b, options=PARALLEL).chains
    assert (c.length, c.per_step_inputs, c.lifted_constants, c.invariant_inputs) == (12, 2, 0, 0)
    W.requires_grad_(), b.requires_grad_()
    with pcr_compile.record_solves() as solves:
        y = torch.compile(f, backend="deeppcr", options=PARALLEL)(x, W, b)
        g = torch.autograd.grad(y.pow(2).sum(), [W, b])
    assert [s.direction for s in solves] == ["forward", "backward"]
    y0 = _sequential(x, W, b)
    g0 = torch.autograd.grad(y0.pow(2).sum(), [W, b])
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for a, e in zip(g, g0):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_reverse_scan_and_closed_over_inputs_float64_gradcheck():
    x, W, b = _data(L=9, w=3, dtype=torch.float64)
    shift = torch.randn(3, dtype=torch.float64)

    def f(x, W, b, shift):
        def step(c, wb):
            w, bb = wb
            return torch.tanh(c @ w.T + bb + shift), torch.empty(0)
        return scan(step, x, (W, b), reverse=True)[0]

    def ref(x, W, b, shift):
        for i in reversed(range(W.shape[0])):
            x = torch.tanh(x @ W[i].T + b[i] + shift)
        return x

    compiled = torch.compile(f, backend="deeppcr", options={**PARALLEL, "min_chain_length": 8})
    inputs = tuple(t.requires_grad_() for t in (x, W, b, shift))
    with pcr_compile.record_solves() as solves:
        torch.testing.assert_close(compiled(*inputs), ref(*inputs))
    assert len(solves) == 1
    assert torch.autograd.gradcheck(compiled, inputs, eps=1e-6, atol=1e-6)


def test_a_scan_whose_per_step_outputs_are_read_gives_them_stacked():
    """Per-step outputs read by the graph: one stack of the unrolled steps' values (Inductor, handed this scan
    itself, fails on torch 2.13); the carries still form the chain."""
    x, W, b = _data(L=10)

    def f(x, W, b):
        def step(c, wb):
            y = torch.tanh(c @ wb[0].T + wb[1])
            return y, y.sum(-1)
        final, ys = scan(step, x, (W, b))
        return final, ys * 2

    def ref(x, W, b):
        sums = []
        for i in range(W.shape[0]):
            x = torch.tanh(x @ W[i].T + b[i])
            sums.append(x.sum(-1))
        return x, torch.stack(sums) * 2

    for options in (PARALLEL, {"mode": "sequential"}):
        torch._dynamo.reset()
        final, ys = torch.compile(f, backend="deeppcr", options=options)(x, W, b)
        final0, ys0 = ref(x, W, b)
        torch.testing.assert_close(final, final0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ys, ys0, rtol=1e-5, atol=1e-5)


def test_sizes_read_in_the_body_under_dynamic_shapes_are_read_once_before_the_loop():
    """A body reading its carry's or slice's size (`arange(x.shape[0])`: `aten.sym_size.int` under dynamic=True)
    read it in every unrolled step off the chain's state, which vmap cannot batch: every solve fell back to
    sequential evaluation. The sizes are read once from the scan's arguments; the chain is solved, with eager's
    values and gradients, at the first batch size and at the later ones (a dynamic batch after the recompile)."""
    _, W, b = _data(L=10, dtype=torch.float64)
    W.requires_grad_()

    def step(x, wb):
        w, bias = wb
        n, k = x.shape[0], w.shape[1]
        ramp = torch.arange(n, dtype=x.dtype)[:, None] / (n * k)
        return torch.tanh(x @ w.T + bias) + ramp, torch.empty(0)

    def f(x, W, b):
        return scan(step, x, (W, b))[0]

    def eager(x, W, b):
        for i in range(W.shape[0]):
            x = step(x, (W[i], b[i]))[0]
        return x

    compiled = torch.compile(f, backend="deeppcr", options=PARALLEL)
    for rows in (4, 3, 5):
        x = torch.randn(rows, 5, dtype=torch.float64)
        with pcr_compile.record_solves() as solves:
            y = compiled(x, W, b)
            (g,) = torch.autograd.grad(y.square().sum(), W)
        y0 = eager(x, W, b)
        (g0,) = torch.autograd.grad(y0.square().sum(), W)
        assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 10, False),
                                                                          ("backward", 10, False)]
        torch.testing.assert_close(y, y0, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g, g0, rtol=1e-8, atol=1e-10)
