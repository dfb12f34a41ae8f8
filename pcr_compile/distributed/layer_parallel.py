"""Layer-parallel chains: one chain of L steps solved across the P ranks of a process group.

Rank r holds n_r consecutive steps (its slice of the stacked per-step parameters) and evaluates them in
one batched call. Every Newton iteration (dense Jacobians, DeepPCR's update form) is

    local:    F, J = f(Zprev), df/dz at the rank's guess (Zprev = [z_in, Z[:-1]]); r = Z - F;
              d_l = J_l d_{l-1} - r_l with d_in = 0: a local PCR scan (kernels.linear_recurrence) whose
              last value is the chunk's offset b_r; its matrix A_r = J_{n-1} ... J_0 (a product tree)
    exchange: ONE all-gather of (A_r, b_r, z_last_r, stopping statistics): O(P B w^2) data, never O(L)
    local:    every rank composes the P summaries in rank order (e_q = A_q e_{q-1} + b_q, e_{-1} = 0, the
              same arithmetic on every rank), takes d_in = e_{r-1}, rescans locally (the same recurrence,
              with J_0 d_in added to its first term) and sets its last step to Z_last + e_r exactly,
              so that rank r+1's z_in is bit for bit rank r's last state.

The stopping test is the project's (`pcr_compile/solver/residual.py: step_residuals`, each step against its own size);
its statistics ride in the same all-gather, so an iteration issues one collective (the issue's separate
all-reduce folded into it). The adjoint is the same in reverse: a local reverse scan with no incoming
gradient gives the chunk's offset m_r (its matrix is A_r^T, already gathered), one all-gather of the
m_r, a composition from the last rank down and a local rescan; then, as the single-device adjoint, it is
refined against exact batched vector-Jacobian products (the next rank's first one all-gathered) until
every step passes the rule (one all-reduce per check); one more batched VJP gives the local parameters'
gradients.

Fallback (the single-device solve's guarantee): when any rank's residuals are non-finite or `max_iters`
pass, all ranks finish sequentially, in rank order, from the accepted prefix: the first rank with an
unaccepted step evaluates its remaining steps one by one, broadcasts its last state, the next rank
evaluates all of its steps, and so on (P - q broadcasts). The adjoint falls back the same way in reverse.
Only torch.distributed collectives (all_gather / broadcast / all_reduce) are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.func import vjp, vmap

from pcr_compile.kernels import linear_recurrence
from pcr_compile.solver.newton import default_tol
from pcr_compile.solver.residual import step_residuals


@dataclass
class ExchangeStats:
    """One layer-parallel solve on one rank: iterations, fallback, and what it exchanged."""

    direction: str
    rank: int
    world: int
    steps: int  # the whole chain's
    iterations: int = 0
    converged: bool = False
    fell_back: bool = False
    prefix: int = 0  # accepted leading steps of the whole chain when the solve stopped
    residuals: list[float] = field(default_factory=list)
    collectives: int = 0
    bytes_sent: int = 0  # this rank's contribution to every collective
    bytes_received: int = 0


_RECORDS: list[ExchangeStats] = []


def records() -> list[ExchangeStats]:
    """This process's layer-parallel solves, oldest first (cleared by `clear_records`)."""
    return list(_RECORDS)


def clear_records() -> None:
    _RECORDS.clear()


class Comm:
    """The collectives of a solve, counted (calls and bytes) into `stats`."""

    def __init__(self, group, stats: ExchangeStats):
        self.group, self.stats = group, stats
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def _count(self, sent: torch.Tensor, received: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += sent.numel() * sent.element_size()
        self.stats.bytes_received += received * sent.element_size()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(P, *t.shape): every rank's `t`."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        self._count(t, (self.world - 1) * t.numel())
        return torch.stack(out)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        t = t.contiguous()
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                       group=self.group)
        self._count(t if self.rank == src else t[:0], 0 if self.rank == src else t.numel())
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self._count(t, t.numel())
        return t


def chunk_product(J: torch.Tensor) -> torch.Tensor:
    """J_{n-1} ... J_1 J_0 for J of shape (n, B, w, w), by a product tree (ceil(log2 n) batched levels)."""
    M = J
    while M.shape[0] > 1:
        m = M.shape[0] // 2 * 2
        pairs = M[1:m:2] @ M[0:m:2]
        M = torch.cat([pairs, M[m:]]) if m < M.shape[0] else pairs
    return M[0]


def _mv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (A @ v.unsqueeze(-1)).squeeze(-1)


def split_sizes(L: int, world: int) -> list[int]:
    """Steps per rank: consecutive chunks, the first `L % world` ranks one step longer."""
    return [L // world + (1 if r < L % world else 0) for r in range(world)]


def _prefix(rho: torch.Tensor, tol: float) -> int:
    bad = (~(rho <= tol)).nonzero()
    return int(bad[0]) if bad.numel() else rho.shape[0]


def forward_solve(evaluate: Callable, one: Callable, z0: torch.Tensor, n: int, comm: Comm, tol: float,
                  max_iters: int):
    """Newton over the ranks. `evaluate(Zprev) -> (F, J)` for this rank's n steps ((n, B, w), (n, B, w, w));
    `one(i, z)`: local step i alone. Returns (Z, z_in, J, A_all): J and A_all (every rank's chunk matrix)
    at the returned trajectory, or None after a fallback."""
    st, P, r = comm.stats, comm.world, comm.rank
    Z = z0.expand(n, *z0.shape).clone()  # (n, B, w): every step guessed as z0
    z_in = z0.clone()
    sizes = [int(x) for x in comm.all_gather(torch.tensor([n]))]  # once per solve
    for k in range(max_iters + 1):
        prev = torch.cat([z_in[None], Z[:-1]])
        F, J = evaluate(prev)
        res = Z - F
        rho = step_residuals(res, F)  # (n,)
        local = torch.tensor([_prefix(rho, tol), float(rho.max()), float(torch.isfinite(rho).all())],
                             dtype=Z.dtype)
        A = chunk_product(J)  # (B, w, w)
        d = linear_recurrence(J, -res, structure="dense")  # d_in = 0
        packed = comm.all_gather(torch.cat([A.reshape(-1), d[-1].reshape(-1), local]))
        A_all = packed[:, :A.numel()].reshape(P, *A.shape)
        b_all = packed[:, A.numel(): A.numel() + d[-1].numel()].reshape(P, *d[-1].shape)
        stats = packed[:, -3:]
        prefixes = [int(x) for x in stats[:, 0].tolist()]
        worst = float(stats[:, 1].max())
        st.residuals.append(worst)
        st.iterations = k
        accepted = 0
        for q in range(P):
            accepted += prefixes[q]
            if prefixes[q] < sizes[q]:
                break
        st.prefix = accepted
        if accepted == sum(sizes):
            st.converged = True
            return Z, z_in, J, A_all
        if not bool(stats[:, 2].all()) or not math.isfinite(worst) or k == max_iters:
            break
        e = torch.zeros_like(z0)
        ends = []
        for q in range(P):  # the same composition, in the same order, on every rank
            e = _mv(A_all[q], e) + b_all[q]
            ends.append(e)
        d_in = ends[r - 1] if r > 0 else torch.zeros_like(z0)
        rhs = -res
        rhs[0] = rhs[0] + _mv(J[0], d_in)
        d = linear_recurrence(J, rhs, structure="dense")
        last = Z[-1] + ends[r]
        Z = Z + d
        Z[-1] = last
        z_in = z_in + d_in
    st.fell_back = True
    Z, z_in = _sequential_over_ranks(one, Z, z_in, prefixes, sizes, comm)
    return Z, z_in, None, None


def _sequential_over_ranks(one, Z, z_in, prefixes, sizes, comm: Comm):
    """Finish from the accepted prefix: ranks in order, each from its predecessor's broadcast last state."""
    P, r = comm.world, comm.rank
    q0 = next(q for q in range(P) if prefixes[q] < sizes[q])
    Z = Z.clone()
    for q in range(q0, P):
        if q > q0:
            got = comm.broadcast(Z[-1].clone() if r == q - 1 else torch.empty_like(z_in), src=q - 1)
            if r == q:
                z_in = got
        if r == q:
            start = prefixes[q] if q == q0 else 0
            z = z_in if start == 0 else Z[start - 1]
            with torch.no_grad():
                for i in range(start, sizes[q]):
                    z = one(i, z)
                    Z[i] = z
    return Z, z_in


def _reverse_solve(J, rhs, A_all, comm: Comm):
    """lam_l = J_{l+1}^T lam_{l+1} + rhs_l over the ranks (nothing beyond the chain's end): a local reverse
    scan with no incoming gradient, one all-gather of the chunk offsets m_q (their matrices are A_q^T),
    the composition from the last rank down, and a local rescan."""
    P, r = comm.world, comm.rank
    mu = linear_recurrence(J, rhs, structure="dense", reverse=True)
    m_all = comm.all_gather(_mv(J[0].transpose(-1, -2), mu[0]))
    u = torch.zeros_like(rhs[0])
    incoming = u
    for q in range(P - 1, r - 1, -1):  # u_q: the gradient entering rank q's last step from rank q+1
        if q == r:
            incoming = u
        u = _mv(A_all[q].transpose(-1, -2), u) + m_all[q]
    rhs = rhs.clone()
    rhs[-1] = rhs[-1] + incoming
    return linear_recurrence(J, rhs, structure="dense", reverse=True)


def adjoint_solve(evaluate: Callable, vjp_prev: Callable, Z, z_in, J, A_all, c, comm: Comm, tol: float,
                  max_iters: int = 8):
    """lam_l = J_{l+1}^T lam_{l+1} + c_l over the ranks, `c` (n, B, w) this rank's steps' cotangents.
    `vjp_prev(Zprev, lam) -> J_l^T lam_l` for every local step (batched). Returns (lam, dz0): dz0 the
    gradient of z0 on every rank (None after a fallback).

    Iterative refinement, as the single-device adjoint: solve, evaluate every step's right-hand side with
    exact vector-Jacobian products (the next rank's first one all-gathered), check the step residuals
    (one all-reduce), and solve again for the correction until every step passes."""
    st, P, r = comm.stats, comm.world, comm.rank
    prev = torch.cat([z_in[None], Z[:-1]])
    if J is None:  # after a forward fallback: the Jacobians at the returned trajectory
        _, J = evaluate(prev)
        A_all = comm.all_gather(chunk_product(J))
    lam = _reverse_solve(J, c, A_all, comm)
    for k in range(max_iters + 1):
        back = vjp_prev(prev, lam)  # (n, B, w): J_l^T lam_l
        first = comm.all_gather(back[0])  # every rank's J_0^T lam_0: the gradient it passes down
        rhs = c.clone()
        rhs[:-1] = rhs[:-1] + back[1:]
        if r < P - 1:
            rhs[-1] = rhs[-1] + first[r + 1]
        rho = step_residuals(lam - rhs, rhs)
        worst = float(comm.all_reduce_max(torch.nan_to_num(rho.max(), nan=math.inf).reshape(1)))
        st.residuals.append(worst)
        st.iterations = k
        if worst <= tol:
            st.converged, st.prefix = True, st.steps
            return lam, first[0]
        if not math.isfinite(worst) or k == max_iters:
            break
        lam = lam + _reverse_solve(J, rhs - lam, A_all, comm)
    st.fell_back = True
    lam = torch.zeros_like(Z)
    u = torch.zeros_like(z_in)
    for q in range(P - 1, -1, -1):  # in reverse rank order, passing J^T lam of each rank's first step down
        if q < P - 1:
            got = comm.broadcast(u.clone() if r == q + 1 else torch.empty_like(u), src=q + 1)
            if r == q:
                u = got
        if r == q:
            g = u
            for i in range(Z.shape[0] - 1, -1, -1):
                g = g + c[i]
                lam[i] = g
                g = _mv(J[i].transpose(-1, -2), g)
            u = g
    return lam, None


class _LocalChain:
    """This rank's steps of `step(params_i, z)` with stacked local `params` (n, ...)."""

    def __init__(self, step: Callable, params: tuple[torch.Tensor, ...]):
        self.step, self.params = step, params

    def batched(self, params, prev):
        return vmap(self.step)(params, prev)

    def evaluate(self, prev):
        F, pull = vjp(lambda zp: self.batched(self.params, zp), prev)
        w = prev.shape[-1]
        basis = torch.eye(w, dtype=prev.dtype).reshape(w, 1, 1, w).expand(w, *prev.shape)
        (rows,) = vmap(pull)(basis)  # (w_out, n, B, w_in)
        return F.detach(), rows.permute(1, 2, 0, 3).detach()

    def one(self, i, z):
        return self.step(tuple(p[i] for p in self.params), z)

    def vjp_prev(self, prev, lam):
        _, pull = vjp(lambda zp: self.batched(self.params, zp), prev)
        return pull(lam)[0]


class _LayerParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, group, tol, max_iters, L, z0, *params):
        chain = _LocalChain(step, tuple(p.detach() for p in params))
        stats = ExchangeStats("forward", dist.get_rank(group), dist.get_world_size(group), L)
        comm = Comm(group, stats)
        with torch.no_grad():
            Z, z_in, J, A_all = forward_solve(chain.evaluate, chain.one, z0.detach(), params[0].shape[0], comm,
                                              tol, max_iters)
            out = comm.broadcast(Z[-1].clone(), src=comm.world - 1)
        _RECORDS.append(stats)
        ctx.chain, ctx.group, ctx.tol, ctx.L, ctx.J, ctx.A_all = chain, group, tol, L, J, A_all
        ctx.save_for_backward(Z, z_in)
        return out

    @staticmethod
    def backward(ctx, g):
        Z, z_in = ctx.saved_tensors
        chain = ctx.chain
        stats = ExchangeStats("backward", dist.get_rank(ctx.group), dist.get_world_size(ctx.group), ctx.L)
        comm = Comm(ctx.group, stats)
        with torch.no_grad():
            c = torch.zeros_like(Z)
            if comm.rank == comm.world - 1:
                c[-1] = g
            lam, g_z0 = adjoint_solve(chain.evaluate, chain.vjp_prev, Z, z_in, ctx.J, ctx.A_all, c, comm,
                                      ctx.tol)
        prev = torch.cat([z_in[None], Z[:-1]])
        _, pull = vjp(chain.batched, chain.params, prev)
        g_params, g_prev = pull(lam)
        if g_z0 is None:  # after a sequential adjoint: rank 0's, to every rank
            g_z0 = comm.broadcast(g_prev[0].clone(), src=0)
        _RECORDS.append(stats)
        return (None, None, None, None, None, g_z0, *g_params)


def layer_parallel(step: Callable, params, z0: torch.Tensor, group=None, *, L: int | None = None,
                   tol: float | None = None, max_iters: int = 50) -> torch.Tensor:
    """z_L of the chain `z_l = step(params_l, z_{l-1})`, solved across the ranks of `group` (None: world).

    `params`: this rank's stacked per-step tensors, each `(n_r, ...)`: steps `sum(n_q, q < r) .. + n_r`
    of the chain (`split_sizes(L, P)` gives the usual split); `z0`: `(B, w)`, the same on every rank (rank
    0's is used). `step(p, z)` maps one step's tuple of slices and a `(B, w)` state to the next (rows
    independent: the Jacobian is taken per row). Returns z_L on every rank. Backward: each rank's local
    parameters get their steps' gradients; the gradient of z_L is the last rank's, and z0's gradient is
    returned on every rank. `tol`: the step-residual tolerance (None: by dtype, as the backend).
    """
    params = tuple(params)
    if not params:
        raise ValueError("layer_parallel needs at least one stacked per-step tensor in `params`")
    if z0.dim() != 2:
        raise ValueError(f"z0 must have shape (B, w), got {tuple(z0.shape)}")
    tol = default_tol(z0.dtype) if tol is None else tol
    if L is None:
        n = torch.tensor([params[0].shape[0]])
        dist.all_reduce(n, group=group)
        L = int(n)
    return _LayerParallel.apply(step, group, tol, max_iters, L, z0, *params)
