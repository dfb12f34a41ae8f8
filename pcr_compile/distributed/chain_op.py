"""The backend option `process_group`: a compiled model's chains solved layer-parallel across its ranks.

    torch.compile(model, backend="deeppcr", options={"mode": "parallel", "process_group": "world"})

Every rank holds the whole (replicated) model and calls it on the same inputs; each chain op then solves
its chain with `layer_parallel.forward_solve`, rank r evaluating its `split_sizes(L, P)[r]` consecutive
steps, and returns the whole trajectory on every rank (one all-gather of the local trajectories per solve,
O(L B w): the graph after the chain reads it). Its backward solves the adjoint with
`layer_parallel.adjoint_solve` and all-reduces the per-step parameter gradients (each rank holds its
steps' rows, zero elsewhere: one all-reduce of the chain's parameter size, as DDP's own), so every rank
ends with the full gradients.

`process_group`: "world" (the default group) or a name given to `register_process_group(name, group)`.
Only dense-Jacobian chains take this route (others solve on each rank alone, as without the option); the
forward runs inside the compiled call (`wrap_compiled` names the group while it runs); the backward of a
chain solved over the ranks runs over the same group.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch.func import vjp

from pcr_compile.solver import routes

from . import layer_parallel as lp

_GROUPS: dict = {}
_ACTIVE = threading.local()
_SOLVED: dict = {}  # chain op name -> the group its last forward was solved over


def register_process_group(name: str, group) -> None:
    """Make `group` usable as `options={"process_group": name}`."""
    _GROUPS[name] = group


def resolve(name: str):
    if name == "world":
        return None
    if name not in _GROUPS:
        raise ValueError(f"deeppcr option 'process_group' must be 'world' or a name registered with "
                         f"pcr_compile.distributed.register_process_group, got {name!r}")
    return _GROUPS[name]


def wrap_compiled(compiled, name: str):
    """`compiled` with the process group `name` active while it runs (chain ops read it)."""
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args):
        before = getattr(_ACTIVE, "name", None)
        _ACTIVE.name = name
        try:
            return compiled(*args)
        finally:
            _ACTIVE.name = before

    run._boxed_call = boxed
    return run


def _group():
    name = getattr(_ACTIVE, "name", None)
    if name is None or not dist.is_available() or not dist.is_initialized():
        return False, None
    return True, resolve(name)


def _stats(ex: lp.ExchangeStats):
    from pcr_compile.solver import newton

    return newton.SolveStats(iterations=ex.iterations, residual=ex.residuals[-1] if ex.residuals else 0.0,
                             converged=ex.converged, fell_back=ex.fell_back, prefix=ex.prefix,
                             residuals=list(ex.residuals), reason=f"layer-parallel over {ex.world} ranks",
                             evaluations=ex.iterations + 1)


def _local_range(L: int, comm: lp.Comm) -> tuple[int, int]:
    sizes = lp.split_sizes(L, comm.world)
    lo = sum(sizes[:comm.rank])
    return lo, lo + sizes[comm.rank]


def forward_over_ranks(spec, call, z0: torch.Tensor, structure: str, tol: float, max_iters: int):
    """(Z (L, B, w) on every rank, SolveStats) when a group is active and the chain is dense; else None."""
    on, group = _group()
    if not on or structure != "dense" or z0.dim() != 2 or call.L < dist.get_world_size(group):
        _SOLVED.pop(spec.name, None)  # its backward then solves on this rank alone, as its forward did
        return None
    ex = lp.ExchangeStats("forward", dist.get_rank(group), dist.get_world_size(group), call.L)
    comm = lp.Comm(group, ex)
    lo, hi = _local_range(call.L, comm)
    with torch.no_grad():
        Z, _, _, _ = lp.forward_solve(lambda Zp: call.evaluate(lo, Zp, True, "dense"),
                                      lambda i, z: call.step(lo + i, z), z0, hi - lo, comm, tol, max_iters)
        n_max = lp.split_sizes(call.L, comm.world)[0]
        pad = torch.cat([Z, Z.new_zeros((n_max - Z.shape[0], *Z.shape[1:]))]) if Z.shape[0] < n_max else Z
        parts = comm.all_gather(pad)  # (P, n_max, B, w): the trajectory for the rest of the graph
        Z_all = torch.cat([parts[q, :n] for q, n in enumerate(lp.split_sizes(call.L, comm.world))])
    lp._RECORDS.append(ex)
    _SOLVED[spec.name] = group
    return Z_all, _stats(ex)


def backward_over_ranks(spec, call, Zprev, Z, cot, diff_stacked, diff_inv, tol: float, max_iters: int):
    """The pullback's outputs (d Zprev, *d stacked, *d invariants) over the ranks, and SolveStats; None
    unless this chain's forward was solved over a group."""
    if spec.name not in _SOLVED or not dist.is_initialized():
        return None
    from pcr_compile.solver.adjoint import _substituted

    group = _SOLVED[spec.name]
    ex = lp.ExchangeStats("backward", dist.get_rank(group), dist.get_world_size(group), call.L)
    comm = lp.Comm(group, ex)
    lo, hi = _local_range(call.L, comm)
    Zp, Zl = Zprev[lo:hi], Z[lo:hi]

    def vjp_prev(zp, lam):
        return vjp(lambda q: call.batched(q, start=lo), zp)[1](lam)[0]

    with torch.no_grad():
        lam, g_z0 = lp.adjoint_solve(lambda q: call.evaluate(lo, q, True, "dense"), vjp_prev, Zl, Zp[0], None,
                                     None, cot[lo:hi].clone(), comm, tol, max_iters)

    def local_map(q, *params):
        stacked, inv = _substituted(call, diff_stacked, diff_inv, params)
        return call.batched(q, stacked, inv, start=lo)

    primals = [Zp, *(call.stacked[i] for i in diff_stacked), *(call.invariants[i] for i in diff_inv)]
    _, pull = vjp(local_map, *primals)
    outs = list(pull(lam))
    grads = outs[1:]  # full-size: zero outside this rank's steps; invariants: this rank's share
    if grads:
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
        dist.all_reduce(flat, group=group)
        ex.collectives += 1
        ex.bytes_sent += flat.numel() * 8
        sizes = [g.numel() for g in grads]
        grads = [f.reshape(g.shape).to(g.dtype) for f, g in zip(flat.split(sizes), grads)]
    if g_z0 is None:
        g_z0 = comm.broadcast(outs[0][0].clone(), src=0)
    dZ = torch.zeros_like(Zprev)
    dZ[0] = g_z0
    lp._RECORDS.append(ex)
    return (dZ, *grads), _stats(ex)


routes.register("layer-parallel", forward_over_ranks, backward_over_ranks)
