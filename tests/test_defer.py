"""Integer and boolean states counted beside a floating chain (`passes/defer.py`): the floating part is
solved, the counting part runs after it on the solved trajectory, exactly."""

import torch
import torch.nn as nn
from conftest import rel_err
from helpers import PARALLEL, dynamo_graph

import pcr_compile
from pcr_compile.passes.chains import find_chains
from pcr_compile.passes.defer import defer_integer_states


class CountingRNN(nn.Module):
    """An RNN cell over time that counts, per row, the steps whose first feature is positive, and keeps a
    boolean flag of any step above 0.5: neither feeds back into `h`."""

    def __init__(self, steps=12, width=8):
        super().__init__()
        self.cell = nn.RNNCell(4, width)
        self.steps = steps

    def forward(self, x, h):
        n = torch.zeros(h.shape[0], dtype=torch.long)
        seen = torch.zeros(h.shape[0], dtype=torch.bool)
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
            n = n + (h[:, 0] > 0).long()
            seen = seen | (h[:, 1] > 0.5)
        return h, n, seen


class CounterFeedsBack(CountingRNN):
    """The counter scales the next input: the floating part reads the integer state."""

    def forward(self, x, h):
        n = torch.zeros(h.shape[0], dtype=torch.long)
        for t in range(self.steps):
            h = self.cell(x[:, t] * (n % 2 + 1)[:, None], h)
            n = n + (h[:, 0] > 0).long()
        return h, n


def _inputs():
    torch.manual_seed(0)
    return torch.randn(5, 12, 4), torch.randn(5, 8)


def _dtype(n):
    return n.meta["example_value"].dtype


def test_the_floating_part_is_a_chain_after_the_counting_part_moves():
    x, h = _inputs()
    gm = dynamo_graph(CountingRNN(), x, h)
    before = find_chains(gm.graph, min_length=8)
    assert before.chains == () and len(before.integer_runs) == 1
    assert "not a floating-point tensor" in before.declined[0].reason
    moved, _ = defer_integer_states(gm.graph, min_length=8)
    assert moved == 1
    gm.graph.lint()
    [chain] = find_chains(gm.graph, min_length=8).chains
    assert chain.length == 12 and chain.kind == "recurrence"
    assert [_dtype(n) for n in chain.initial] == [torch.float32]
    # the counters' updates (long adds, bool ors) now follow the chain's last node
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    counting = [n for n in gm.graph.nodes if n.op == "call_function" and "example_value" in n.meta
                and getattr(n.target, "__name__", "") in ("add", "or_") and _dtype(n) in (torch.long, torch.bool)]
    assert len(counting) == 24 and all(order[n] > order[chain.last] for n in counting)


def test_counting_rnn_values_counts_and_gradients_match_eager():
    x, h = _inputs()
    model = CountingRNN()
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    with pcr_compile.record_solves() as solves:
        y, n, seen = torch.compile(model, backend="deeppcr", options=PARALLEL)(xr, hr)
        y.square().sum().backward()
    gx, gh = xr.grad.clone(), hr.grad.clone()
    xr.grad = hr.grad = None
    y0, n0, seen0 = model(xr, hr)
    y0.square().sum().backward()
    assert {s.direction for s in solves} == {"forward", "backward"}
    assert torch.equal(n, n0) and torch.equal(seen, seen0) and n.dtype == torch.long and seen.dtype == torch.bool
    assert 0 < int(n.sum()) < 5 * 12  # the counts are not trivial
    assert rel_err(y, y0) < 1e-5 and rel_err(gx, xr.grad) < 1e-5 and rel_err(gh, hr.grad) < 1e-5


def test_an_integer_state_the_floating_part_reads_stays_declined():
    x, h = _inputs()
    model = CounterFeedsBack()
    report = pcr_compile.explain(model, x, h, options={"mode": "parallel"})
    assert report.chains == [] and any("not a floating-point tensor" in d.reason for d in report.declined)
    with torch.no_grad():
        y, n = torch.compile(model, backend="deeppcr", options=PARALLEL)(x, h)
        y0, n0 = model(x, h)
    assert torch.equal(n, n0) and rel_err(y, y0) < 1e-6


class CountingUnderAutocast(CountingRNN):
    """Each step opens a bfloat16 region; inside it a float value of the counter goes through a matmul."""

    def __init__(self, steps=12, width=8):
        super().__init__(steps, width)
        self.lin = nn.Linear(1, width)

    def forward(self, x, h):
        n = torch.zeros(h.shape[0], dtype=torch.long)
        acc = torch.zeros_like(h)
        for t in range(self.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.cell(x[:, t], h).float()
                n = n + (h[:, 0] > 0).long()
                acc = acc + self.lin(n[:, None].float() * 1.37)
        return h, n, acc


def test_a_run_cast_down_by_autocast_is_left_in_order():
    """Moved after the run, `lin(n)` left its step's bfloat16 region and computed in float32 (1.7e-3 off
    eager's acc); and a count of `h > 0` read off a trajectory solved to bfloat16's tolerance was off by one
    in a row of seven. Such runs stay declined: evaluated in order, as torch.compile does."""
    x, h = _inputs()
    model = CountingUnderAutocast()
    report = pcr_compile.explain(model, x, h, options={"mode": "parallel"})
    assert report.chains == [] and any("not a floating-point tensor" in d.reason for d in report.declined)
    with torch.no_grad(), pcr_compile.record_solves() as solves:
        y, n, acc = torch.compile(model, backend="deeppcr", options=PARALLEL)(x, h)
        y0, n0, acc0 = model(x, h)
    assert solves == [] and torch.equal(n, n0)
    assert rel_err(acc, acc0) < 2e-4  # bfloat16's matmul, as eager's (float32's was 1.7e-3 off)


def test_a_run_whose_floating_state_reads_the_counter_is_not_moved():
    """The pass changes nothing (no reordering, so no copy of the graph) where the floating state depends on
    the integer one."""
    x, h = _inputs()
    gm = dynamo_graph(CounterFeedsBack(), x, h)
    order = [n.name for n in gm.graph.nodes]
    assert defer_integer_states(gm.graph, min_length=8)[0] == 0
    assert [n.name for n in gm.graph.nodes] == order
