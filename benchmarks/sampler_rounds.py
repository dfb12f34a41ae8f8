"""The diffusion suite's iteration counts on the trained fixture: rounds, denoiser work and error per sampler.

For each scheduler (DDIM with clip_sample off / on, DDPM, Euler, DPM-Solver++) and step count, the fixture
(``benchmarks/fixtures/blob_unet.py``) samples a fixed batch three ways: sequentially in float64 (the
reference), sequentially in float32 (the loop as diffusers runs it), and by `parallel_sample` in float32
under each solver setting. Reported per solve: rounds (batched denoiser calls), steps of a sequential
finish, the depth (their sum: never above the step count), denoiser work in steps (`step_evaluations`,
and its ratio to sequential's L), and the final sample's error `||x - ref|| / ||ref||` against both
sequential results. The float32 floor is the sequential float32 loop's own error against float64. "kept":
which candidate `jacobian="auto"` kept after its race (scalar Newton or identity, i.e. Picard + Anderson).
Iteration counts do not depend on the device; no timings here.

    python -m benchmarks.sampler_rounds [--quick] [--schedulers ddim,ddpm] [--steps 25,50] [--out FILE.md]
    python -m benchmarks.sampler_rounds --oracle      # dense-Jacobian Newton on DDIM 50 / 100 (a bound)
    python -m benchmarks.sampler_rounds --oracle --steps 100 --approximations exact,trace,trace+rank32
    python -m benchmarks.sampler_rounds --compiled [--schedulers ddim,ddim-clip] [--steps 50,100]

`--compiled`: the same loops through `torch.compile(loop, backend="deeppcr", options={"mode": "parallel",
"sampler_jacobian": ...})` instead of `parallel_sample`, once per `sampler_jacobian` (each a compile of the
unrolled loop: ~40 s at 50 steps on this CPU), counts read from `pcr_compile.record_solves()`. The compiled
chain has no scheduler to read `x0_gain` from, so its scalar Newton starts from gains of one.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

STEPS = (25, 50, 100)
SCHEDULERS = ("ddim", "ddim-clip", "ddpm", "euler", "dpm")
# (accel, jacobian, rule, tol): plain Picard, Picard + Anderson (the default before jacobian="auto"), scalar
# Newton, the defaults (jacobian="auto", exact rule at float32's 1e-6) and looser tolerances, Picard + Anderson
# at 1e-4 beside them, and the noise-level rule at two tolerances
SETTINGS = (("picard", "identity", "exact", None), ("auto", "identity", "exact", None),
            ("picard", "scalar", "exact", None), ("auto", "auto", "exact", None),
            ("auto", "auto", "exact", 1e-5), ("auto", "auto", "exact", 3e-5), ("auto", "auto", "exact", 1e-4),
            ("auto", "identity", "exact", 1e-4), ("auto", "auto", "exact", 1e-3),
            ("auto", "auto", "sigma", 1e-2), ("auto", "auto", "sigma", 1e-3))


@dataclass(frozen=True)
class Row:
    scheduler: str
    steps: int
    accel: str
    jacobian: str
    chosen: str
    rule: str
    tol: float
    rounds: int
    sequential_steps: int
    depth: int
    step_evaluations: int
    err_fp64: float
    err_fp32: float
    floor: float
    reason: str


def make_scheduler(name: str):
    import diffusers

    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False)
    if name == "ddim-clip":
        return diffusers.DDIMScheduler()  # clip_sample=True: diffusers' default
    if name == "ddpm":
        return diffusers.DDPMScheduler()
    if name == "euler":
        return diffusers.EulerDiscreteScheduler()
    if name == "dpm":
        return diffusers.DPMSolverMultistepScheduler()
    raise ValueError(f"unknown scheduler {name!r}; one of {SCHEDULERS}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cases(schedulers, steps, batch: int, seed: int):
    """(scheduler name, steps, loop, its float64 twin, initial latents) over the fixture, in table order."""
    from benchmarks.fixtures.blob_unet import load_blob_unet
    from pcr_compile.diffusion import sampling_loop

    unet = load_blob_unet()
    unet64 = copy.deepcopy(unet).double()
    for name in schedulers:
        for n in steps:
            sched = make_scheduler(name)
            loop, loop64 = sampling_loop(unet, sched, n), sampling_loop(unet64, sched, n)
            latents = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
            yield name, n, loop, loop64, latents * loop.init_noise_sigma


def measure(schedulers=SCHEDULERS, steps=STEPS, settings=SETTINGS, batch: int = 2, seed: int = 0) -> list[Row]:
    from pcr_compile.diffusion.parallel import parallel_sample

    rows = []
    for name, n, loop, loop64, latents in _cases(schedulers, steps, batch, seed):
        noise = loop.draw_noise(latents, torch.Generator().manual_seed(seed + 1)) if loop.plan.stochastic else None
        with torch.no_grad():
            ref = loop64(latents.double(), noise=None if noise is None else noise.double())
            seq = loop(latents, noise=noise)
        floor = _rel(seq, ref)
        for accel, jacobian, rule, tol in settings:
            y, st = parallel_sample(loop, latents, noise=noise, accel=accel, jacobian=jacobian, rule=rule, tol=tol)
            rows.append(Row(name, n, accel, jacobian, st.chosen, rule, tol if tol is not None else 1e-6,
                            st.evaluations, st.sequential_steps, st.depth, st.step_evaluations, _rel(y, ref),
                            _rel(y, seq), floor, st.reason))
    return rows


def dense_newton_oracle(steps: int = 100, tols=(1e-6, 1e-4, 1e-3), batch: int = 2, seed: int = 0,
                        approximations=("exact",)) -> list[str]:
    """Rounds of Newton with the *exact* per-step Jacobians of the converged trajectory (DDIM, clip off), a
    bound on what any Jacobian approximation (scalar, diagonal) of the sampler solve can reach on the fixture.

    The Jacobians `d f_l / d z_{l-1}` `(L, B, w, w)` are taken once at the sequential float32 trajectory by
    forward-mode AD (`torch.func.jvp`, all steps batched, one basis vector at a time); each round then solves
    `delta_l = g_l + J_l delta_{l-1}` densely, with the sampler solve's prefix acceptance and exact-step commit.

    `approximations` replaces the exact Jacobians by what a cheaper update could carry (:func:`approximate`):
    how much of the step Jacobian a method must know to reach the exact Newton's rounds.
    """
    from torch.func import jvp, vmap

    from benchmarks.fixtures.blob_unet import load_blob_unet
    from pcr_compile.diffusion import sampling_loop
    from pcr_compile.diffusion.parallel import BatchedSteps
    from pcr_compile.kernels import linear_recurrence
    from pcr_compile.solver.residual import step_residuals

    unet = load_blob_unet()
    unet64 = copy.deepcopy(unet).double()
    sched = make_scheduler("ddim")
    loop, loop64 = sampling_loop(unet, sched, steps), sampling_loop(unet64, sched, steps)
    latents = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    f = BatchedSteps(loop, latents, None, {})
    z0, L = f.pack(latents), steps
    with torch.no_grad():
        ref64 = loop64(latents.double())
        traj, z = [], z0
        for l in range(L):
            z = f(l, z.unsqueeze(0))[0]
            traj.append(z)
        Zp = torch.cat([z0.unsqueeze(0), torch.stack(traj)[:-1]])
        w = z0.shape[-1]
        J = torch.zeros(L, batch, w, w)
        for b in range(batch):
            for i in range(0, w, 16):
                k = min(16, w - i)
                V = torch.zeros(k, *Zp.shape)
                V[torch.arange(k), :, b, i + torch.arange(k)] = 1.0
                cols = vmap(lambda v: jvp(lambda Z: f(0, Z), (Zp,), (v,))[1])(V)  # (k, L, B, w)
                J[:, b, :, i: i + k] = cols[:, :, b, :].permute(1, 2, 0)
    out = []
    for name, tol in ((name, tol) for name in approximations for tol in tols):
        Ja = approximate(J, name)
        with torch.no_grad():
            s, z_prev, Zw, rounds, Z = 0, z0, z0.unsqueeze(0).expand(L, *z0.shape).clone(), 0, torch.empty(L, *z0.shape)
            while s < L:
                n = L - s
                F = f(s, torch.cat([z_prev.unsqueeze(0), Zw[:-1]]))
                rounds += 1
                g = F - Zw
                rho = step_residuals(g, F).tolist()
                p = next((i for i, r in enumerate(rho) if not r <= tol), n)
                Z[s: s + p] = Zw[:p]
                if p == n:
                    break
                Z[s + p] = z_prev = F[p]
                g[:p] = 0
                Zw = (Zw + linear_recurrence(Ja[s: s + n], g, structure="dense"))[p + 1:]
                s += p + 1
        err = _rel(Z[-1].reshape(latents.shape), ref64)
        update = "dense Newton (exact Jacobians at the solution)" if name == "exact" else \
            f"Newton with `{name}` of the exact Jacobians"
        out.append(f"| ddim | {steps} | {update} | exact | {tol:g} | {rounds} | {err:.1e} |")
    return out


def approximate(J: torch.Tensor, name: str) -> torch.Tensor:
    """An approximation of step Jacobians `J` `(L, B, w, w)`, dense: `exact`; `trace` (the scalar
    `tr J / w` times I); `diagonal` (J's diagonal in the pixel basis); `trace+rankK` (the scalar plus the best
    rank-K approximation of `J - scalar I`, per step and row); `trace+sharedK` (that remainder projected onto
    one K-dimensional subspace of its rows shared by every step and row)."""
    if name == "exact":
        return J
    w = J.shape[-1]
    eye = torch.eye(w, dtype=J.dtype)
    tr = torch.diagonal(J, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    if name == "trace":
        return tr * eye
    if name == "diagonal":
        return torch.diag_embed(torch.diagonal(J, dim1=-2, dim2=-1))
    rest = J - tr * eye
    for prefix in ("trace+rank", "trace+shared"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            k = int(name[len(prefix):])
            if prefix == "trace+rank":
                U, S, Vh = torch.linalg.svd(rest)
                return tr * eye + (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
            rows = rest.reshape(-1, w)  # every step's and batch row's Jacobian rows, stacked
            basis = torch.linalg.svd(rows, full_matrices=False)[2][:k].T  # (w, k)
            return tr * eye + rest @ basis @ basis.T
    raise ValueError(f"approximation: unknown {name!r} (exact, trace, diagonal, trace+rankK, trace+sharedK)")


COMPILED_SETTINGS = ("identity", "scalar", "auto")  # sampler_jacobian; "identity": the compiled path before 2026-12-03


def measure_compiled(schedulers=("ddim", "ddim-clip"), steps=(50, 100), settings=COMPILED_SETTINGS, batch: int = 2,
                     seed: int = 0) -> list[Row]:
    """`measure`'s rows for the compiled path: default tol (the dtype's, 1e-6), exact rule, full window."""
    import pcr_compile

    rows = []
    for name, n, loop, loop64, latents in _cases(schedulers, steps, batch, seed):
        if loop.plan.stochastic:
            raise ValueError(f"--compiled measures deterministic samplers only, not {name!r}")
        with torch.no_grad():
            ref, seq = loop64(latents.double()), loop(latents)
        floor = _rel(seq, ref)
        for jac in settings:
            torch._dynamo.reset()
            compiled = torch.compile(loop, backend="deeppcr",
                                     options={"mode": "parallel", "strict": True, "sampler_jacobian": jac})
            with torch.no_grad(), pcr_compile.record_solves() as solves:
                y = compiled(latents)
            [st] = solves
            accel = "picard" if jac == "scalar" else "auto"
            rows.append(Row(name, n, accel, jac, st.chosen, "exact", 1e-6, st.evaluations, st.sequential_steps,
                            st.evaluations + st.sequential_steps, st.step_evaluations, _rel(y, ref), _rel(y, seq),
                            floor, st.reason))
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| scheduler | steps | jacobian / accel | kept | rule | tol | rounds | seq. finish | depth "
            "| denoiser work (x L) | err vs fp64 | err vs fp32 | fp32 floor |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        kept = r.chosen.split("/")[0] if r.jacobian == "auto" else ""
        out.append(f"| {r.scheduler} | {r.steps} | {r.jacobian} / {r.accel} | {kept} | {r.rule} | {r.tol:g} | "
                   f"{r.rounds} | {r.sequential_steps} | {r.depth} | "
                   f"{r.step_evaluations} ({r.step_evaluations / r.steps:.1f}) | "
                   f"{r.err_fp64:.1e} | {r.err_fp32:.1e} | {r.floor:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_rounds", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="25 steps, DDIM only, two settings")
    p.add_argument("--oracle", action="store_true",
                   help="instead: Newton with the exact (dense) Jacobians of the converged trajectory, DDIM 50 / "
                        "100 steps, clip off (forward-mode AD over every step; minutes)")
    p.add_argument("--approximations", default="exact",
                   help="with --oracle: comma-separated Jacobian approximations (exact, trace, diagonal, "
                        "trace+rankK, trace+sharedK), each solved in turn")
    p.add_argument("--compiled", action="store_true",
                   help="instead: through torch.compile(backend='deeppcr', mode='parallel'), once per "
                        "sampler_jacobian (defaults: --schedulers ddim,ddim-clip --steps 50,100)")
    p.add_argument("--schedulers", default=None)
    p.add_argument("--steps", default=None)
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    if a.oracle:
        for name in a.approximations.split(","):  # a bad name fails now, not after minutes of Jacobians
            approximate(torch.zeros(1, 1, 2, 2), name)
        text = ("| scheduler | steps | update | rule | tol | rounds | err vs fp64 |\n|---|---|---|---|---|---|---|\n"
                + "\n".join(line for n in (tuple(int(s) for s in a.steps.split(",")) if a.steps else (50, 100))
                            for line in dense_newton_oracle(n, approximations=tuple(a.approximations.split(","))))
                + "\n")
    elif a.compiled:
        rows = measure_compiled(tuple((a.schedulers or "ddim,ddim-clip").split(",")),
                                tuple(int(s) for s in (a.steps or "50,100").split(",")))
        text = markdown(rows)
    else:
        if a.quick:
            rows = measure(("ddim",), (25,), SETTINGS[1:4:2])
        else:
            rows = measure(tuple((a.schedulers or ",".join(SCHEDULERS)).split(",")),
                           tuple(int(s) for s in (a.steps or ",".join(map(str, STEPS))).split(",")))
        text = markdown(rows)
    text += f"\n({time.time() - t0:.0f} s)\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
