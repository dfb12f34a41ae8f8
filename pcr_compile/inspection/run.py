"""Stage 4 of `pcr-compile inspect`: ``torch.compile(model, backend="deeppcr", options=...)`` run once (forward, and
backward on request) under ``record_solves``, compared with eager; the residual plot of its solves."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..options import Options
from .targets import Target

LOSS = "sum over tensor outputs of mean(y.float() ** 2)"


def short_name(chain: str) -> str:
    """A chain op's name without its namespace."""
    return chain.removeprefix("pcr_compile::")


def _tensor_leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _loss(out) -> torch.Tensor | None:
    ts = [t for t in _tensor_leaves(out) if t.requires_grad]
    return sum(t.float().pow(2).mean() for t in ts) if ts else None


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    abs_err = max((float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b)
                   if x.numel()), default=0.0)
    scale = max((float(y.detach().double().abs().max()) for y in b if y.numel()), default=0.0)
    return abs_err, abs_err / scale if scale > 0 else abs_err


def run_compiled(target: Target, options: Options, backward: bool = False) -> dict:
    """Run `torch.compile(model, backend="deeppcr", options=...)` once (and its backward), record every solve."""
    from ..runtime.records import record_solves

    model, inputs, kwargs = target.model, target.inputs, target.kwargs
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    y_ref = model(*inputs, **kwargs)
    ref = [t.detach() for t in _tensor_leaves(y_ref)]
    loss_ref = _loss(y_ref) if backward and params else None
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True) if loss_ref is not None else None

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deeppcr", options=options.as_dict())
    with record_solves() as solves:
        y = compiled(*inputs, **kwargs)
        outs = _tensor_leaves(y)
        grad_err = None
        if g_ref is not None:
            loss = _loss(y)
            g = torch.autograd.grad(loss, params, allow_unused=True) if loss is not None else None
            if g is not None:
                pairs = [(a, b) for a, b in zip(g, g_ref) if a is not None and b is not None]
                grad_err = _max_err([a for a, _ in pairs], [b for _, b in pairs])[1]
    torch._dynamo.reset()
    abs_err, rel_err = _max_err(outs, ref)
    return {"backward": g_ref is not None, "loss": LOSS,
            "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in outs],
            "max_abs_error": abs_err, "max_rel_error": rel_err, "grad_max_rel_error": grad_err,
            "solves": [{**asdict(s), "residuals": list(s.residuals)} for s in solves]}


def plot_residuals(run: dict, path: str) -> None:
    """Residual per iteration of every solve, log scale (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(run["solves"]):
        ys = [r if r > 0 else float("nan") for r in s["residuals"]]
        ax.semilogy(range(len(ys)), ys, marker="o", label=f"{i}: {s['direction']} {short_name(s['chain'])} "
                                                           f"({s['length']} steps, {s['jacobian']})")
    if not run["solves"]:
        ax.text(0.5, 0.5, "no chain solves ran (nothing was rewritten)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("iteration (0: initial guess)")
    ax.set_ylabel("max relative residual")
    ax.set_title("pcr-compile: residual per iteration of each chain solve")
    ax.grid(True, which="both", alpha=0.3)
    if run["solves"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

