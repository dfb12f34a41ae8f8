"""Stage 3 of `pcr-compile inspect`: the AOTAutograd forward and backward graphs of the rewritten graphs, through a
capturing backend that rewrites as deeppcr does and runs the graphs uncompiled."""

from __future__ import annotations

import torch

from ..options import Options
from .analysis import _readable, chain_ops_in
from .run import _loss
from .targets import Target


def capture_aot(target: Target, options: Options) -> list[dict]:
    """The AOTAutograd forward/backward graphs of every rewritten graph (one forward, and a backward when the
    output requires grad, through a backend that rewrites like deeppcr and runs the graphs uncompiled)."""
    from ..backend import capturing_backend

    graphs: list[dict] = []
    backend = capturing_backend(options, graphs)

    torch._dynamo.reset()
    loss = _loss(torch.compile(target.model, backend=backend)(*target.inputs, **target.kwargs))
    if loss is not None:
        loss.backward()
    torch._dynamo.reset()
    result = []
    for e in graphs:
        fw, bw = e["forward"], e["backward"]
        result.append({"graph": e["graph"], "forward": _readable(fw) if fw is not None else None,
                       "backward": _readable(bw) if bw is not None else None,
                       "chain_ops": {"forward": chain_ops_in(fw) if fw is not None else [],
                                     "backward": chain_ops_in(bw) if bw is not None else []}})
    return result

