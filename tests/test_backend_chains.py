"""Chains of other shapes through the backend, against eager: values of earlier steps read after the chain,
non-differentiable invariants, recurrent cells over a sequence, scalar states, templates that cannot be batched."""


import pytest
import torch
import torch.nn as nn
from conftest import grads_rel_err, rel_err
from helpers import PARALLEL, call_targets, capture_graphs, run_both

import pcr_compile
from pcr_compile.models import ResidualMLP


class _MaskedStack(nn.Module):
    """Blocks reading a boolean mask shared by every step (like an attention mask in a transformer)."""

    def __init__(self, layers=10, width=6):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x, mask):
        for layer in self.layers:
            x = torch.tanh(layer(x)).masked_fill(mask, 0.0)
        return x


def test_non_differentiable_invariant_input_in_backward():
    """An invariant with no gradient (a bool mask) gets no adjoint: the backward must not trip over it."""
    torch.manual_seed(0)
    model = _MaskedStack()
    x, mask = torch.randn(4, 6), torch.rand(4, 6) < 0.3
    y0, g0, y1, g1, solves = run_both(model, [x, mask])
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [s.direction for s in solves] == ["forward", "backward"]
    assert not any(s.fell_back for s in solves)


class _TanhRNN(nn.Module):
    """h_t = tanh(W_i x_t + W_h h_{t-1}); returns every step's readout (an RNN over the sequence dim)."""

    def __init__(self, features=4, hidden=6, out=3):
        super().__init__()
        self.hidden = hidden
        self.inp, self.rec, self.head = nn.Linear(features, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)

    def forward(self, xs):
        h = xs.new_zeros(xs.shape[0], self.hidden)
        outs = []
        for t in range(xs.shape[1]):
            h = torch.tanh(self.inp(xs[:, t]) + self.rec(h))
            outs.append(self.head(h))
        return torch.stack(outs, 1), h


class _CollectsPreActivations(nn.Module):
    """Reads a value inside every step (not the carried state) after the chain."""

    def __init__(self, layers=10, width=5):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        pre = []
        for lin in self.lins:
            z = lin(x)
            pre.append(z)
            x = torch.tanh(z)
        return x, torch.stack(pre)


class _ResidualHiddenStates(nn.Module):
    """Pre-norm residual blocks returning every block's input, like `output_hidden_states=True`."""

    def __init__(self, blocks=10, width=80):
        super().__init__()
        self.blocks = ResidualMLP(blocks=blocks, width=width).blocks

    def forward(self, x):
        hidden = [x]
        for b in self.blocks:
            x = b(x)
            hidden.append(x)
        return torch.stack(hidden)


def _two_output_loss(out):
    a, b = out
    return a.pow(2).mean() + b.sin().sum()


@pytest.mark.parametrize("make,inputs,loss", [
    (_TanhRNN, lambda: [torch.randn(3, 12, 4)], _two_output_loss),
    (_CollectsPreActivations, lambda: [torch.randn(4, 5)], _two_output_loss),
    (_ResidualHiddenStates, lambda: [torch.randn(2, 3, 80)],
     lambda y: (y * torch.linspace(-1, 1, 11)[:, None, None, None]).sum()),
], ids=["rnn-readouts", "pre-activations", "hidden-states"])
def test_values_of_earlier_steps_read_after_the_chain(make, inputs, loss):
    """Every step's outputs are read after the loop: one chain over all steps, values read from the solved
    trajectory (states) or recomputed from it (other values), with their gradients joining the adjoint."""
    torch.manual_seed(0)
    model, xs = make(), inputs()
    y0, g0, y1, g1, solves = run_both(model, xs, loss=loss)
    for a, b in zip(y1 if isinstance(y1, tuple) else [y1], y0 if isinstance(y0, tuple) else [y0]):
        assert rel_err(a, b) < 1e-5
    assert grads_rel_err(g1, g0) < 1e-4
    steps = {12 if make is _TanhRNN else 10}
    assert [s.direction for s in solves] == ["forward", "backward"] and {s.length for s in solves} == steps
    assert not any(s.fell_back for s in solves)
    [c] = pcr_compile.explain(make(), *xs, options=PARALLEL).chains
    assert c.exposed_values >= 9 and c.decision == "parallel"


class _SkipConnections(nn.Module):
    """A UNet's shape: the up path reads the down path's every step (its skips, in reverse) and starts from its
    last state. Both are chains; the up chain's per-step inputs and initial state are the down chain's outputs,
    which the down chain's rewrite replaces by reads of its op's results."""

    def __init__(self, layers=10, width=6):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        skips = []
        for layer in self.down:
            x = torch.tanh(layer(x))
            skips.append(x)
        for layer in self.up:
            x = torch.tanh(layer(x) + skips.pop())
        return x


def test_a_chain_reading_an_earlier_chains_steps():
    torch.manual_seed(0)
    model = _SkipConnections().double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y0, g0, y1, g1, solves = run_both(model, [x], loss=lambda y: y.pow(2).sum())
    assert sorted((s.direction, s.length) for s in solves) == [("backward", 9), ("backward", 10), ("forward", 9),
                                                              ("forward", 10)], solves
    assert not any(s.fell_back for s in solves)
    assert rel_err(y1, y0) < 1e-9 and grads_rel_err(g1, g0) < 1e-8


def test_exposed_values_without_grad_and_with_a_window():
    torch.manual_seed(0)
    model = _CollectsPreActivations(layers=16)
    x = torch.randn(4, 5)
    with torch.no_grad():
        ref = model(x)
        for options in (PARALLEL, {**PARALLEL, "window": 4}):
            torch._dynamo.reset()
            with pcr_compile.record_solves() as solves:
                out = torch.compile(model, backend="deeppcr", options=options)(x)
            assert [s.direction for s in solves] == ["forward"]
            assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5


def test_recomputed_values_stay_outside_the_chain_op():
    """The pre-activations are recomputed by 10 linears in the graph around the op: the chain's own 10
    linears and tanhs are gone, and the op returns the trajectory they read."""
    class Summed(_CollectsPreActivations):
        def forward(self, x):
            last, pre = super().forward(x)
            return last + pre.sum(0)

    seen = capture_graphs(Summed(), [torch.randn(4, 5)])
    after = call_targets(seen["dynamo"])
    assert sum("chain_" in t for t in after) == 1
    assert sum("linear" in t for t in after) == 10 and not any("tanh" in t for t in after)
    name = seen["names"][0].replace("::", ".")
    assert any(t.startswith(name) for t in call_targets(seen["forward"]))
    assert f"{name}_adjoint.default" in call_targets(seen["backward"])


class _SharedAndPerStep(nn.Module):
    """Per-step weights plus one weight shared by every step (an invariant input with a gradient)."""

    def __init__(self, layers=10, width=5):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.shared = nn.Parameter(torch.randn(width) * 0.3)

    def forward(self, x):
        for lin in self.lins:
            x = torch.tanh(lin(x) + self.shared * x)
        return x


def test_unbatchable_template_falls_back_step_by_step_in_both_directions(monkeypatch, caplog):
    """When vmap cannot run the template, the forward evaluates in order and the adjoint takes one VJP per
    step: both exact, both recorded as fallbacks, with a warning."""
    from pcr_compile import solver

    def no_vmap(self, *a, **k):
        raise RuntimeError("Batching rule not implemented for aten::synthetic")

    monkeypatch.setattr(solver.ChainCall, "batched", no_vmap)
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="pcr_compile.solver"):
        y0, g0, y1, g1, solves = run_both(_SharedAndPerStep(), [torch.randn(4, 5)])
    assert rel_err(y1, y0) < 1e-6 and grads_rel_err(g1, g0) < 1e-6
    assert [(s.direction, s.fell_back) for s in solves] == [("forward", True), ("backward", True)]
    assert all("synthetic" in s.reason for s in solves)
    assert "parallel adjoint" in caplog.text


class _LSTMSequence(nn.Module):
    def __init__(self, cell="lstm", features=4, hidden=6):
        super().__init__()
        self.kind, self.hidden = cell, hidden
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[cell](features, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, xs, h0, c0):
        h, c, outs = h0, c0, []
        for t in range(xs.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(xs[:, t], (h, c))
            else:
                h = self.cell(xs[:, t], h)
            outs.append(self.head(h))
        return torch.stack(outs, 1)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_recurrent_cells_over_a_sequence_are_solved_in_parallel(cell):
    """nn.LSTMCell / nn.GRUCell / nn.RNNCell unrolled over 12 time steps with per-step readouts: one parallel
    solve (the cells' kernels are replaced by vmap-friendly compositions: no batched fallback's warning),
    values and gradients as eager's."""
    import warnings

    torch.manual_seed(0)
    model = _LSTMSequence(cell)
    xs, h0, c0 = torch.randn(3, 12, 4), torch.randn(3, 6), torch.randn(3, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y0, g0, y1, g1, solves = run_both(model, [xs, h0, c0])
    assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
    assert rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    # The LSTM's carried values are h and c (not the cell's tuple result), so its chain starts inside step 0.
    steps = 11 if cell == "lstm" else 12
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", steps, False),
                                                                       ("backward", steps, False)]


class _PaddedGRU(nn.Module):
    """A GRU over padded sequences, the padding mask made in the step from the lengths: `lengths > t`."""

    def __init__(self, form, features=3, hidden=6):
        super().__init__()
        self.cell, self.form = nn.GRUCell(features, hidden), form

    def forward(self, xs, h, lengths):
        for t in range(xs.shape[1]):
            new = self.cell(xs[:, t], h)
            if self.form == "where":
                h = torch.where((t < lengths)[:, None], new, h)
            else:
                m = lengths.gt(t).unsqueeze(-1).to(h.dtype)
                h = m * new + (1 - m) * h
        return h


@pytest.mark.parametrize("form", ["where", "blend"])
def test_padding_mask_compared_with_the_step_index_is_lifted(form):
    """The comparison with the step's Python int was not liftable: the recurrence was declined ("constant
    argument 1 of gt differs between steps"). The index is a per-step input: one chain, eager's values."""
    torch.manual_seed(0)
    model = _PaddedGRU(form).double()
    xs, h0 = torch.randn(4, 12, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    lengths = torch.tensor([12, 7, 3, 1])
    y0, g0, y1, g1, solves = run_both(model, [xs, h0, lengths])
    assert rel_err(y1, y0) < 1e-9 and grads_rel_err(g1, g0) < 1e-9
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 12, False), ("backward", 12, False)]
    # the padded rows keep their state from the step after their length on
    torch.testing.assert_close(y1[3], model.cell(xs[3:4, 0], h0[3:4])[0], rtol=1e-9, atol=1e-9)


class _ScalarRecurrence(nn.Module):
    """x <- tanh(a_i x + b_i) on a 0-d state, the coefficients indexed per step."""

    def __init__(self, steps=12):
        super().__init__()
        self.steps = steps
        self.a = nn.Parameter(torch.rand(steps) * 0.5)
        self.b = nn.Parameter(torch.randn(steps))

    def forward(self, x):
        for i in range(self.steps):
            x = torch.tanh(self.a[i] * x + self.b[i])
        return x


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_scalar_state(shape):
    torch.manual_seed(0)
    y0, g0, y1, g1, solves = run_both(_ScalarRecurrence(), [torch.randn(shape)])
    assert y1.shape == y0.shape and rel_err(y1, y0) < 1e-5 and grads_rel_err(g1, g0) < 1e-4
    assert [(s.direction, s.length, s.fell_back) for s in solves] == [("forward", 12, False), ("backward", 12, False)]


class _ScaledBlock(nn.Module):
    def __init__(self, a, w=6):
        super().__init__()
        self.lin, self.a = nn.Linear(w, w), a

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return (1 - self.a) * x + self.a * y + y.mul(self.a / 2)


class _ScheduleLoop(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))

    def forward(self, x, alphas):
        for a in alphas:
            x = a ** 0.5 * x - (1 - a) * self.net(x)
        return x


def test_floats_made_dynamic_by_a_recompile_are_batched_not_read_on_the_host():
    """A float attribute or a schedule that changes between calls is recompiled by Dynamo as a 0-d tensor read
    with `.item()`; inside a chain that read cannot be batched by vmap, and every solve fell back to sequential
    evaluation. passes/scalars.py keeps such reads tensors: the recompiled chain is solved, with eager's values
    and gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    model = nn.Sequential(*[_ScaledBlock(0.3 + 0.02 * i) for i in range(10)]).double()
    compiled = torch.compile(model, backend="deeppcr", options=PARALLEL)
    compiled(x)
    for block in model:
        block.a += 0.05  # Dynamo recompiles with the floats dynamic
    params = list(model.parameters())
    with pcr_compile.record_solves() as solves:
        y = compiled(x)
        g = torch.autograd.grad(y.square().sum(), params)
    y0 = model(x)
    g0 = torch.autograd.grad(y0.square().sum(), params)
    assert [(s.direction, s.fell_back) for s in solves] == [("forward", False), ("backward", False)]
    assert rel_err(y, y0) < 1e-9 and grads_rel_err(g, g0) < 1e-9
    loop = _ScheduleLoop().double()
    compiled = torch.compile(loop, backend="deeppcr", options=PARALLEL)
    for k in range(3):  # a new schedule each call: dynamic from the second
        alphas = [0.9 - 0.01 * i - 0.003 * k for i in range(12)]
        with pcr_compile.record_solves() as solves:
            y = compiled(x, alphas)
        assert [(s.direction, s.fell_back) for s in solves] == [("forward", False)]
        assert rel_err(y, loop(x, alphas)) < 1e-9


class _SizedBlock(nn.Module):
    """A block that builds a tensor of the state's batch size (symbolic under dynamic=True): the template reads it."""

    def __init__(self, width=6):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        n = x.shape[0]
        ramp = torch.arange(n, dtype=x.dtype, device=x.device)[:, None] / n
        return torch.tanh(self.lin(x)) + 0.1 * ramp


def test_training_a_chain_whose_template_reads_symbolic_sizes():
    """A chain reading symbolic sizes (a causal mask over a dynamic sequence length; here `arange(x.shape[0])`
    under dynamic=True) passes them as `syms`. torch.library flattens a list of SymInts as one leaf, and the op's
    backward returned a list of Nones for it: AOTAutograd's trace of the backward failed ("Expected the return
    from backward to be of the same structure as the inputs") and the compile raised. Values and gradients
    against eager, three sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_SizedBlock() for _ in range(9)]).double()
    # A head around the chain: the graph goes through AOTAutograd (solves_only skips it).
    compiled = torch.compile(lambda x: model(x).sum(1), backend="deeppcr", options=PARALLEL, dynamic=True)
    params = list(model.parameters())
    for rows in (5, 4, 3):
        x = torch.randn(rows, 6, dtype=torch.float64)
        with pcr_compile.record_solves() as solves:
            y = compiled(x)
            g = torch.autograd.grad(y.square().sum(), params)
        y0 = model(x).sum(1)
        g0 = torch.autograd.grad(y0.square().sum(), params)
        assert [(s.direction, s.fell_back) for s in solves] == [("forward", False), ("backward", False)]
        assert rel_err(y, y0) < 1e-9 and grads_rel_err(g, g0) < 1e-9
