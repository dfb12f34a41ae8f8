"""Tests of benchmarks/counting.py and benchmarks/gpu_model.py: exact counts of known functions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder at the repository root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import counting, gpu_model  # noqa: E402


def _known(x, w):
    y = x @ w.t()  # t: a view; matmul of 2-d tensors: one mm
    y = torch.tanh(y)  # launch
    y = y.view(-1)  # view
    s = y.sum()  # launch
    if s.item() > -1e30:  # a host sync (_local_scalar_dense), no launch
        y = y.unsqueeze(0).expand(3, -1)  # views
    idx = torch.nonzero(y[0])  # a launch and a host sync (the output size depends on the data)
    z = torch.empty_like(y)  # an allocation: no launch
    z.copy_(y)  # an in-place write: a launch
    return z.reshape(-1) + 1, idx  # reshape of a contiguous tensor is a view; add launches


def test_counts_a_known_function_exactly():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    c = counting.count_call(lambda: _known(x, w))
    assert dict(c.by_op) == {"aten:mm": 1, "aten:tanh": 1, "aten:sum": 1, "sync:_local_scalar_dense": 1,
                             "aten:nonzero": 1, "sync:nonzero": 1, "aten:copy_": 1, "aten:add.Tensor": 1}
    assert (c.aten, c.inductor, c.triton, c.launches, c.syncs) == (6, 0, 0, 6, 2)


def test_backward_is_counted_and_views_are_not():
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4)
    c = counting.count_call(lambda: torch.tanh(x @ w).sum().backward())
    # forward: mm, tanh, sum; backward: expand of the sum's gradient is a view, tanh_backward, mm for w's
    # gradient (x.t() a view), and the accumulation into w.grad of a fresh tensor is a no-copy steal.
    assert c.by_op["aten:mm"] == 2 and c.by_op["aten:tanh"] == 1 and c.by_op["aten:tanh_backward"] == 1
    assert not any(k.startswith(("aten:t", "aten:expand", "aten:view")) and k not in ("aten:tanh", "aten:tanh_backward")
                   for k in c.by_op)
    assert c.syncs == 0


def test_item_seen_as_itself_is_one_sync():
    c = counting.Counts()
    mode = counting.CountingMode(c, counting.threading.local())
    x = torch.tensor([2.0])
    mode.__torch_dispatch__(torch.ops.aten.item.default, (), (x,))  # as the chain op's functorch guard shows it
    assert (c.syncs, c.launches) == (1, 0)


def test_views_and_allocations_are_not_launches():
    assert counting.is_view(torch.ops.aten.transpose.int) and counting.is_view(torch.ops.aten.detach.default)
    assert not counting.is_view(torch.ops.aten.add_.Tensor)  # writes its input: a launch
    assert not counting.is_view(torch.ops.aten.clone.default)
    x = torch.randn(3, 4)
    c = counting.count_call(lambda: (x.t(), x[1:], x.unbind(0), x.detach(), torch.empty(5), x.new_empty(2)))
    assert c.launches == 0 and c.syncs == 0


def test_compiled_calls_count_inductor_kernels_not_eager_ops():
    f = torch.compile(lambda x: (x.sin() + 1).cos())
    x = torch.randn(8)
    f(x)
    c = counting.count_call(lambda: f(x))
    # One fused kernel; the dispatch mode must not make Dynamo run the function eagerly (3 aten ops).
    assert c.inductor == 1 and c.aten == 0 and c.launches == 1, dict(c.by_op)
    torch._dynamo.reset()


def test_triton_launches_are_counted_under_the_interpreter():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from benchmarks.providers import triton_interpreted

    if not (triton_interpreted() or torch.cuda.is_available()):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.zeros(10, device="cuda" if torch.cuda.is_available() else "cpu")

    def two_launches():
        add_one[(1,)](x, 10, BLOCK=16)
        add_one[(1,)](x, 10, BLOCK=16)

    c = counting.count_call(two_launches)
    assert c.triton == 2 and c.by_op["triton:add_one"] == 2
    assert c.aten == 0 and c.syncs == 0  # the interpreter's own host copies are not the program's ops
    assert torch.equal(x, torch.full_like(x, 2.0))


def test_gpu_model_is_labelled_and_adds_up():
    assert gpu_model.estimate_ms(1000, 0) == pytest.approx(gpu_model.LAUNCH_US)
    assert gpu_model.estimate_ms(0, 100) == pytest.approx(gpu_model.SYNC_US / 10)
    assert "MODEL" in gpu_model.ASSUMPTIONS and f"{gpu_model.LAUNCH_US:g} us" in gpu_model.ASSUMPTIONS


def test_every_host_read_of_the_solver_is_one_sync_on_a_cpu_too():
    from pcr_compile.kernels import settings
    from pcr_compile.solver.newton import newton_forward

    torch.manual_seed(0)
    L, B, w = 12, 2, 3
    W = torch.randn(L, w, w, dtype=torch.float64) * 0.3

    def evaluate(start, Zprev, need_A):
        Ws = W[start: start + Zprev.shape[0]]
        F = torch.tanh(torch.einsum("lij,lbj->lbi", Ws, Zprev))
        return F, (1 - F * F)[..., None] * Ws[:, None] if need_A else None

    def step(l, z):
        return torch.tanh(z @ W[l].T)

    before = settings.host_read_count()
    c = counting.count_call(lambda: newton_forward(torch.randn(B, w, dtype=torch.float64), L, evaluate, step,
                                                   structure="dense", tol=1e-12, max_iters=20,
                                                   solve_dtype=torch.float64, impl="torch"))
    reads = settings.host_read_count() - before
    assert reads >= 2 and c.by_op["sync:to_host"] == reads and c.syncs == reads  # no other sync on a CPU
