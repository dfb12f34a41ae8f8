"""The launch settings of every Triton kernel (``pcr_compile.kernels.settings``), decided on fake GPUs.

The planner is a pure function of (rows, L, width, dtype, device properties), so its CUDA decisions are
tested here without one: an H200 (132 SMs) and a small GPU (20 SMs). Launches go through one helper that
sets the CUDA device and counts them; the count is checked under the interpreter.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch

from pcr_compile.kernels import linear_recurrence, settings
from pcr_compile.kernels.settings import DeviceProps, plan_chunk

H200 = DeviceProps(sm_count=132, name="fake H200")
SMALL = DeviceProps(sm_count=20, name="fake small GPU")
F32, F64 = torch.float32, torch.float64
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def n_chunks(rows, L, width, dtype=F32, props=H200):
    return -(-L // plan_chunk(rows, L, width, dtype, props))


@pytest.mark.parametrize("w", [16, 33, 48, 64])
def test_batch_16_deep_mlp_is_cut_at_every_width(w):
    """DeepMLP(1024, w) at batch 16: 16 programs alone would use 16 of 132 SMs; every width is cut."""
    n = n_chunks(16, 1024, w)
    assert n > 1 and 1024 / n >= settings.min_chunk(w)
    if w <= 16:
        assert 16 * n >= 0.9 * settings.PROGRAMS_PER_SM * H200.sm_count  # enough programs to fill the GPU


def test_small_gpu_gets_fewer_chunks():
    assert 1 < n_chunks(16, 1024, 16, props=SMALL) < n_chunks(16, 1024, 16, props=H200)
    assert 16 * n_chunks(16, 1024, 16, props=SMALL) >= settings.PROGRAMS_PER_SM * SMALL.sm_count


def test_long_chain_is_cut_even_when_the_rows_fill_the_gpu():
    rows = settings.PROGRAMS_PER_SM * H200.sm_count  # the rows alone fill the GPU
    assert plan_chunk(rows, 1024, 16, F32, H200) == settings.MAX_CHUNK
    assert plan_chunk(rows, 1024, 16, F64, H200) == settings.MAX_CHUNK // 2  # float64 steps cost twice
    assert n_chunks(64 * rows, 1024, 16) == 1  # ... but never beyond MAX_WAVES waves of programs
    assert n_chunks(rows, 200, 16) == 1  # a short chain of a full GPU stays whole


def test_off_cuda_short_chains_and_forced_chunks():
    assert plan_chunk(4, 1024, 16, F32, None) == 1024  # CPU / interpreter: one chunk
    assert plan_chunk(4, 20, 16, F32, H200) == 20  # too short to cut
    assert plan_chunk(4, 1024, 16, F32, None, chunk=7) == 7
    assert plan_chunk(4, 5, 16, F32, H200, chunk=70) == 5
    assert plan_chunk(4, 5, 16, F32, H200, chunk=0) == 1


@pytest.mark.parametrize("props", [H200, SMALL], ids=["H200", "small"])
def test_plans_are_valid_everywhere(props):
    for rows, L, w, dt in itertools.product([1, 3, 16, 100, 528, 5000], [1, 2, 31, 64, 100, 1024, 4097],
                                            [1, 2, 16, 33, 64], [F32, F64]):
        chunk = plan_chunk(rows, L, w, dt, props)
        n = -(-L // chunk)
        assert 1 <= chunk <= L and n * chunk >= L > (n - 1) * chunk
        if n > 1:
            assert chunk >= settings.min_chunk(w) and rows * n <= max(
                settings.MAX_WAVES * settings.PROGRAMS_PER_SM * props.sm_count, rows)


def test_warps_follow_the_work_of_a_program():
    """No one-warp programs over 1024-element blocks: at most 16 block elements per thread."""
    for W_PAD in (2, 4, 8, 16, 32, 64):
        assert W_PAD * W_PAD <= 16 * 32 * settings.dense_warps(W_PAD)
        for n in (1, 7, 16, 100, 1000, 5000, 10**6):
            block, warps = settings.reduce_settings(n, W_PAD)
            assert block >= min(n, 1024) and block <= 8 * 32 * warps
            assert W_PAD * W_PAD <= 16 * 32 * warps
    for N in (1, 16, 100, 512, 10**5):
        block, warps = settings.elementwise_settings(N)
        assert 16 <= block <= 512 and block <= 4 * 32 * warps


def test_dtypes_and_widths():
    assert settings.compute_dtype(torch.bfloat16) == F32 and settings.compute_dtype(F64) == F64
    assert [settings.w_pad(w) for w in (1, 2, 3, 16, 17, 33, 64)] == [2, 2, 4, 16, 32, 64, 64]
    assert settings.dot_precision(F32) == "tf32x3" and settings.dot_precision(F64) == "ieee"
    assert settings.device_props(torch.device("cpu")) is None


class FakeKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, args, meta))


def test_launch_sets_the_device_and_counts(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    k, before = FakeKernel(), settings.launch_count()
    settings.launch(k, (3, 2), 1, 2, device=torch.device("cuda", 1), W_PAD=4)
    settings.launch(k, (1,), device=torch.device("cpu"))
    assert k.calls == [((3, 2), (1, 2), {"W_PAD": 4}), ((1,), (), {})]
    assert entered == [torch.device("cuda", 1)]  # CPU tensors (the interpreter) need no device context
    assert settings.launch_count() - before == 2 and settings.LAUNCHES == settings.launch_count()


def test_iteration_counter_is_not_specialised():
    from pcr_compile.kernels.triton_newton import _newton_carry_kernel as k

    dns = getattr(k, "do_not_specialize", None) or k.kwargs.get("do_not_specialize")  # JIT or interpreter
    names = [k.arg_names[i] if isinstance(i, int) else i for i in dns]
    assert names == ["k"]


@pytest.mark.skipif(not INTERPRET, reason="counts launches of interpreted kernels")
def test_launches_are_counted_through_the_launchers():
    from pcr_compile.kernels.triton_newton import fused_newton_launch
    from pcr_compile.kernels.triton_pcr import linear_recurrence_triton
    from pcr_compile.solver.residual import tiny

    A, b = torch.randn(9, 2, 3, 3) * 0.3, torch.randn(9, 2, 3)
    before = settings.launch_count()
    linear_recurrence(A, b, structure="dense", impl="triton")
    assert settings.launch_count() - before == 1  # one chunk off CUDA: one scan
    before = settings.launch_count()
    linear_recurrence_triton(A, b, structure="dense", chunk=4)
    assert settings.launch_count() - before == 3  # summaries, scan of the carries, rescan
    z0, W = torch.randn(2, 3), torch.randn(6, 3, 3) * 0.3
    before = settings.launch_count()
    _, it, conv, _ = fused_newton_launch(z0, W, None, "tanh", False, 1e-6, 0, tiny(z0.dtype), chunk=2)
    assert settings.launch_count() - before == 3  # max_iters=0: eval, summary, carry
