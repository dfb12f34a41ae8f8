"""Stage 1 of `pcr-compile inspect`: the model and its example inputs (a built-in example or a user callable),
and the backend options parsed from --options."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..options import Options


class TargetError(ValueError):
    """TARGET could not be loaded, or its callable did not return `(model, example_inputs)` or
    `(model, example_inputs, example_kwargs)`."""


class OptionsError(ValueError):
    """--options is not a JSON object of valid backend options."""


@dataclass
class Target:
    spec: str
    description: str
    model: object
    inputs: tuple
    kwargs: dict = field(default_factory=dict)  # keyword inputs: model(*inputs, **kwargs)



@dataclass(frozen=True)
class Builtin:
    """A built-in example: its size flags with their defaults, its line in `pcr-compile inspect --help`, and
    `build(sizes) -> (model, description, example input)`."""

    sizes: dict
    help: str
    build: Callable[[dict], tuple]


def _mlp(s):
    from ..models import DeepMLP

    return (DeepMLP(layers=s["layers"], width=s["width"], activation="tanh", gain=0.9),
            f"DeepMLP: {s['layers']} x (Linear({s['width']}, {s['width']}) + tanh)",
            torch.randn(s["batch"], s["width"]))


def _resmlp(s):
    from ..models import ResidualMLP

    return (ResidualMLP(blocks=s["layers"], width=s["width"]),
            f"ResidualMLP: {s['layers']} pre-norm residual blocks of width {s['width']}",
            torch.randn(s["batch"], s["width"]))


def _resnet(s):
    from ..models import ConvResNet

    return (ConvResNet(blocks=s["layers"], channels=s["width"]),
            f"ConvResNet: {s['layers']} residual conv blocks, {s['width']} channels, 8x8 images",
            torch.randn(s["batch"], 3, 8, 8))


def _ddim(s):
    from ..models import DDIMSampler, MLPDenoiser

    return (DDIMSampler(MLPDenoiser(dim=2, hidden=s["width"]), steps=s["steps"]),
            f"DDIMSampler: {s['steps']} DDIM steps of an MLPDenoiser (hidden {s['width']}) on 2-d points",
            torch.randn(s["batch"], 2))


# The one table of built-in examples: `builtin_target`, the CLI's TARGET choices and its help read it.
BUILTINS = {
    "mlp": Builtin({"layers": 16, "width": 8, "batch": 4},
                   "DeepMLP: --layers x (Linear(--width, --width) + tanh), gain 0.9", _mlp),
    "resmlp": Builtin({"layers": 16, "width": 16, "batch": 4},
                      "ResidualMLP: --layers pre-norm residual blocks of --width", _resmlp),
    "resnet": Builtin({"layers": 8, "width": 8, "batch": 2},
                      "ConvResNet: --layers conv blocks, --width channels, 8x8 images", _resnet),
    "ddim": Builtin({"steps": 10, "width": 32, "batch": 4},
                    "DDIMSampler: --steps DDIM steps of an MLPDenoiser, hidden --width", _ddim),
}


def builtins_help() -> str:
    """The built-in examples' lines of `pcr-compile inspect --help`, with their defaults."""
    lines = []
    for name, b in BUILTINS.items():
        defaults = ", ".join(f"{k} {v}" if k == "batch" else str(v) for k, v in b.sizes.items())
        lines.append(f"  {name:<8} {b.help:<68} (defaults {defaults})")
    return "\n".join(lines)


def builtin_target(name: str, seed: int = 0, **sizes) -> Target:
    """A built-in example (a key of :data:`BUILTINS`); `sizes` are its flags (None: the default)."""
    if name not in BUILTINS:
        raise TargetError(f"unknown built-in example {name!r}; choose from {sorted(BUILTINS)}")
    allowed = BUILTINS[name].sizes
    extra = sorted(k for k, v in sizes.items() if v is not None and k not in allowed)
    if extra:
        raise TargetError(f"{', '.join('--' + k for k in extra)} does not apply to {name!r} "
                          f"(it takes {', '.join('--' + k for k in allowed)})")
    s = {k: (sizes.get(k) if sizes.get(k) is not None else d) for k, d in allowed.items()}
    bad = sorted(k for k, v in s.items() if v < 1)
    if bad:
        raise TargetError(f"{', '.join('--' + k for k in bad)} must be >= 1")
    torch.manual_seed(seed)
    model, desc, x = BUILTINS[name].build(s)
    return Target(name, desc, model, (x,))


def _import_file(path: str):
    p = Path(path)
    if not p.is_file():
        raise TargetError(f"{path}: no such file")
    name = f"_pcr_compile_target_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise TargetError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(p.resolve().parent))  # like `python file.py`: the file's siblings are importable
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise TargetError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_target(spec: str) -> Target:
    """`package.module:callable` or `path/to/file.py:callable`; the callable returns `(model, example_inputs)` or
    `(model, example_inputs, example_kwargs)`, example_kwargs a dict of keyword inputs (`attention_mask=...`,
    `use_cache=False`)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise TargetError(f"{spec!r} is neither a built-in example ({', '.join(sorted(BUILTINS))}) nor "
                          "'package.module:callable' or 'path/to/file.py:callable'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _import_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise TargetError(f"cannot import module {where!r}: {type(e).__name__}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise TargetError(f"{where} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TargetError(f"{spec}: {attr} is not callable")
    try:
        result = fn()
    except Exception as e:
        raise TargetError(f"{spec}() raised {type(e).__name__}: {e}") from e
    expected = ("expected (model, example_inputs) or (model, example_inputs, example_kwargs) with example_inputs "
                "a tuple of tensors and example_kwargs a dict")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise TargetError(f"{spec}() returned {_describe(result)}; {expected}")
    model, inputs, kwargs = (*result, {}) if len(result) == 2 else result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not callable(model):
        raise TargetError(f"{spec}() returned a model that is not callable ({_describe(model)}); {expected}")
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TargetError(f"{spec}() returned example_inputs {_describe(inputs)}; {expected}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TargetError(f"{spec}() returned example_kwargs {_describe(kwargs)}; {expected}")
    return Target(spec, type(model).__name__, model, tuple(inputs), dict(kwargs))


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj[:4])})"
    return f"a {type(obj).__name__}"


def parse_options(text: str | None) -> Options:
    """--options JSON -> Options; OptionsError (one line) on malformed JSON or a value Options.parse rejects."""
    if text is None:
        return Options()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionsError(f"options: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise OptionsError(f"options: expected a JSON object such as '{{\"mode\": \"parallel\"}}', got {text!r}")
    try:
        return Options.parse(value)
    except (ValueError, TypeError) as e:
        raise OptionsError(f"options: {e}") from e

