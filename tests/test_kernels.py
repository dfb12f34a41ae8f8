"""Tests of ``pcr_compile.kernels.linear_recurrence``: every structure, direction, implementation and dtype.

Each case is compared with the step-by-step float64 evaluation (``linear_recurrence_sequential``) of the
same inputs (rounded to the tested dtype first, so only the solver's own error is measured). Triton cases
run on CUDA, or on CPU through the Triton interpreter when ``TRITON_INTERPRET=1`` is set before Triton is
imported (``make test`` sets it); interpreted Triton is slow, so those shapes stay small.
"""

from __future__ import annotations

import os

import pytest
import torch

from pcr_compile.kernels import linear_recurrence, linear_recurrence_sequential

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]
STRUCTURES = ("dense", "diagonal", "identity")
# (atol, rtol) relative to the solution's scale, per dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# (L, w, batch): every L in (1, 2, 3, 7, 33, 100), every w in (1, 3, 5, 8, 17), batch (), (3,), (2, 3).
CASES = [(1, 1, ()), (2, 3, (3,)), (3, 5, (2, 3)), (7, 8, ()), (33, 17, (3,)), (100, 3, ())]


def skip_unless_runnable(impl: str, device: str) -> None:
    """Triton on a CPU tensor needs the interpreter; say so rather than fail."""
    if impl == "triton" and device == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before Triton is imported")


def make_inputs(structure, L, w, batch, dtype=torch.float32, device="cpu", seed=0):
    """Contractive coefficients (so errors do not blow up with L), built in float64 and rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(L, *batch, w, generator=g, dtype=torch.float64)
    if structure == "dense":
        A = torch.randn(L, *batch, w, w, generator=g, dtype=torch.float64) * (0.9 / w**0.5)
    elif structure == "diagonal":
        A = torch.rand(L, *batch, w, generator=g, dtype=torch.float64) * 1.9 - 0.95
    else:
        A = None
    to = dict(dtype=dtype, device=device)
    return (None if A is None else A.to(**to)), b.to(**to)


def check(A, b, structure, reverse, impl, **kw):
    """Solve with ``impl`` and compare with the float64 sequential reference of the same (rounded) inputs."""
    z = linear_recurrence(A, b, structure=structure, reverse=reverse, impl=impl) if not kw else kw["solve"](A, b)
    assert z.shape == b.shape and z.dtype == b.dtype and z.device == b.device
    A64 = None if A is None else A.double().cpu()
    ref = linear_recurrence_sequential(A64, b.double().cpu(), structure=structure, reverse=reverse)
    tol = TOL[b.dtype]
    scale = max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(z.double().cpu(), ref, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("L,w,batch", CASES, ids=[f"L{c[0]}-w{c[1]}-b{len(c[2])}" for c in CASES])
def test_shapes_match_sequential(L, w, batch, structure, reverse, impl, device):
    skip_unless_runnable(impl, device)
    A, b = make_inputs(structure, L, w, batch, device=device, seed=L * 31 + w)
    check(A, b, structure, reverse, impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_dtypes(structure, reverse, dtype, impl, device):
    skip_unless_runnable(impl, device)
    A, b = make_inputs(structure, 9, 5, (2,), dtype=dtype, device=device, seed=3)
    check(A, b, structure, reverse, impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("w", [1, 2, 16, 33, 64, 70])
def test_dense_widths(w, reverse, device):
    """Every padded block width the Triton kernel compiles (2..64), and the PyTorch fallback above 64."""
    skip_unless_runnable("triton", device)
    A, b = make_inputs("dense", 5, w, (2,), device=device, seed=w)
    check(A, b, "dense", reverse, "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("structure,w", [("dense", 5), ("dense", 17), ("diagonal", 5), ("identity", 3)])
def test_two_level_chunks(structure, w, reverse, chunk, device):
    """The two-level scan (chunk summaries, carries, rescan), forced with small chunks; w=17 uses tl.dot."""
    skip_unless_runnable("triton", device)
    from pcr_compile.kernels.triton_pcr import linear_recurrence_triton

    A, b = make_inputs(structure, 23, w, (2,), device=device, seed=chunk)
    solve = lambda A, b: linear_recurrence_triton(A, b, structure=structure, reverse=reverse, chunk=chunk)
    check(A, b, structure, reverse, "triton", solve=solve)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_unused_coefficient_is_never_read(structure, reverse, impl, device):
    """A[0] is unused in both directions: NaN there must not leak into z."""
    skip_unless_runnable(impl, device)
    A, b = make_inputs(structure, 6, 3, (2,), device=device)
    A[0] = float("nan")
    z = linear_recurrence(A, b, structure=structure, reverse=reverse, impl=impl)
    assert torch.isfinite(z).all()
    A[0] = 0.0
    check(A, b, structure, reverse, impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_contiguous_inputs(impl, device):
    skip_unless_runnable(impl, device)
    A, b = make_inputs("dense", 6, 3, (4, 2), device=device)
    A, b = A.transpose(1, 2), b.transpose(1, 2)  # (L, 2, 4, w, w), (L, 2, 4, w)
    check(A, b, "dense", True, impl)


def test_auto_is_torch_on_cpu():
    A, b = make_inputs("dense", 7, 3, (2,))
    auto = linear_recurrence(A, b, structure="dense", impl="auto")
    assert torch.equal(auto, linear_recurrence(A, b, structure="dense", impl="torch"))


@pytest.mark.parametrize(
    "A_shape,b_shape,structure,match",
    [
        ((5, 2, 3, 4), (5, 2, 3), "dense", r"A must have shape \(L, \*batch, w, w\)"),
        ((5, 2, 3), (5, 2, 3), "dense", r"A must have shape \(L, \*batch, w, w\)"),
        ((5, 2, 4), (5, 2, 3), "diagonal", r"A must have shape \(L, \*batch, w\)"),
        ((4, 3), (5, 3), "diagonal", r"A must have shape"),
        (None, (5,), "identity", r"b must have shape \(L, \*batch, w\)"),
        (None, (0, 3), "identity", r"b must have shape"),
        ((5, 3), (5, 3), "identity", r"A must be None"),
        (None, (5, 3), "dense", r"A must be a tensor"),
        (None, (5, 3), "tridiagonal", r"structure must be one of"),
    ],
)
def test_bad_shapes_raise(A_shape, b_shape, structure, match):
    A = None if A_shape is None else torch.zeros(A_shape)
    with pytest.raises(ValueError, match=match):
        linear_recurrence(A, torch.zeros(b_shape), structure=structure)


def test_bad_dtype_and_impl_raise():
    with pytest.raises(ValueError, match="b must have a floating dtype"):
        linear_recurrence(None, torch.zeros(4, 3, dtype=torch.int64), structure="identity")
    with pytest.raises(ValueError, match="A and b must have the same dtype"):
        linear_recurrence(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3), structure="diagonal")
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_recurrence(None, torch.zeros(4, 3), structure="identity", impl="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_long_chain_triton(structure, device):
    skip_unless_runnable("triton", device)
    A, b = make_inputs(structure, 1000, 8, (3,), device=device, seed=7)
    check(A, b, structure, False, "triton")
    check(A, b, structure, True, "triton")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("w", [33, 48, 64])
def test_two_level_chunks_at_widths_over_32(w, reverse):
    """Every width up to 64 is cut into chunks (the w x w chunk maps are tl.dot products there)."""
    skip_unless_runnable("triton", "cpu")
    from pcr_compile.kernels.triton_pcr import linear_recurrence_triton

    A, b = make_inputs("dense", 13, w, (2,), seed=w)
    solve = lambda A, b: linear_recurrence_triton(A, b, structure="dense", reverse=reverse, chunk=4)
    check(A, b, "dense", reverse, "triton", solve=solve)
