"""pcr_compile/options.py: one parse, errors that name the option and what it accepts."""

from __future__ import annotations

import pytest
import torch

from pcr_compile.kernels import IMPLS
from pcr_compile.options import JACOBIANS, KERNELS, MODES, Options


def test_defaults_and_round_trip():
    o = Options.parse(None)
    assert (o.mode, o.tol, o.max_iters, o.kernels) == ("auto", None, 50, "auto")
    assert o.sampler_jacobian == "auto"  # as parallel_sample's jacobian
    assert Options.parse(o) is o
    assert Options.parse(o.as_dict()) == o


@pytest.mark.parametrize("key, value, says", [
    ("mode", "fast", "one of ('auto', 'parallel', 'sequential')"),
    ("jacobian", "full", "one of ('auto', 'dense'"),
    ("kernels", "cuda", "one of ('auto', 'triton', 'torch')"),
    ("sampler_jacobian", "dense", "one of ('auto', 'scalar', 'identity')"),
    ("sampler_jacobian", None, "one of ('auto', 'scalar', 'identity')"),
    ("tol", 0.0, "None or a number in (0, 1)"),
    ("tol", True, "None or a number in (0, 1)"),
    ("max_iters", -1, "an int >= 0"),
    ("min_chain_length", 1, "an int >= 2"),
    ("window", 2.0, "an int >= 0"),
    ("strict", 1, "a bool"),
    ("inductor_mode", "turbo", "None or one of"),
])
def test_each_bad_value_is_named_with_what_it_accepts(key, value, says):
    with pytest.raises(ValueError) as e:
        Options.parse({key: value})
    assert f"option {key!r} must be" in str(e.value) and says in str(e.value) and repr(value) in str(e.value)


def test_unknown_keys_and_non_dicts_are_errors():
    with pytest.raises(ValueError, match=r"unknown deeppcr option\(s\) \['tolerance'\]; accepted options"):
        Options.parse({"tolerance": 1e-6})
    with pytest.raises(ValueError, match=r"unknown deeppcr option\(s\) \[1, 'tolerance'\]"):  # keys of two types:
        Options.parse({1: 2, "tolerance": 1e-6})  # sorting them for the message raised TypeError
    with pytest.raises(ValueError, match="option 'tol' must be"):  # an Options made directly is checked too
        Options.parse(Options(tol=-1.0))
    with pytest.raises(ValueError, match="options must be a dict, got list"):
        Options.parse([("mode", "parallel")])


def test_the_kernels_values_are_the_kernels_packages_own():
    assert KERNELS is IMPLS and "triton" in KERNELS
    assert MODES == ("auto", "parallel", "sequential") and "dense" in JACOBIANS


def test_sampler_jacobian_accepts_the_sampler_solves_updates():
    from pcr_compile.options import SAMPLER_JACOBIANS
    from pcr_compile.solver.sampler import JACOBIANS as SOLVER_JACOBIANS

    assert set(SAMPLER_JACOBIANS) == set(SOLVER_JACOBIANS)
    for value in SAMPLER_JACOBIANS:
        assert Options.parse({"sampler_jacobian": value}).sampler_jacobian == value


def test_numbers_of_other_types_are_accepted_as_python_numbers():
    """numpy's float32 / int64 are numbers in range: they were refused with "must be a number in (0, 1)"."""
    import numpy as np

    o = Options.parse({"tol": np.float32(1e-5), "max_iters": np.int64(5), "window": np.int32(4)})
    assert (type(o.tol), type(o.max_iters), type(o.window)) == (float, int, int)
    assert (o.max_iters, o.window) == (5, 4) and abs(o.tol - 1e-5) < 1e-12
    for key, value in (("tol", torch.tensor(1e-6)), ("window", torch.tensor(3)), ("max_iters", np.bool_(True))):
        with pytest.raises(ValueError, match=f"option {key!r} must be"):
            Options.parse({key: value})
