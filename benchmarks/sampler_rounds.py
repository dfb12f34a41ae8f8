"""The diffusion suite's iteration counts on the trained fixture: rounds, denoiser work and error per sampler.

For each scheduler (DDIM with clip_sample off / on, DDPM, Euler, DPM-Solver++) and step count, the fixture
(``benchmarks/fixtures/blob_unet.py``) samples a fixed batch three ways: sequentially in float64 (the
reference), sequentially in float32 (the loop as diffusers runs it), and by `parallel_sample` in float32
under each solver setting. Reported per solve: rounds (batched denoiser calls), steps of a sequential
finish, the depth (their sum: never above the step count), denoiser work in steps (`step_evaluations`,
and its ratio to sequential's L), and the final sample's error `||x - ref|| / ||ref||` against both
sequential results. The float32 floor is the sequential float32 loop's own error against float64.
Iteration counts do not depend on the device; no timings here.

    python -m benchmarks.sampler_rounds [--quick] [--schedulers ddim,ddpm] [--steps 25,50] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

STEPS = (25, 50, 100)
SCHEDULERS = ("ddim", "ddim-clip", "ddpm", "euler", "dpm")
# (accel, rule, tol): the defaults (exact rule at float32's 1e-6), and the noise-level rule at two tolerances
SETTINGS = (("picard", "exact", None), ("auto", "exact", None), ("auto", "exact", 1e-4), ("auto", "exact", 1e-3),
            ("auto", "sigma", 1e-2), ("auto", "sigma", 1e-3))


@dataclass(frozen=True)
class Row:
    scheduler: str
    steps: int
    accel: str
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


def measure(schedulers=SCHEDULERS, steps=STEPS, settings=SETTINGS, batch: int = 2, seed: int = 0) -> list[Row]:
    from benchmarks.fixtures.blob_unet import load_blob_unet
    from pcr_compile.diffusion import sampling_loop
    from pcr_compile.diffusion.parallel import parallel_sample

    unet = load_blob_unet()
    unet64 = copy.deepcopy(unet).double()
    rows = []
    for name in schedulers:
        for n in steps:
            sched = make_scheduler(name)
            loop, loop64 = sampling_loop(unet, sched, n), sampling_loop(unet64, sched, n)
            latents = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
            latents = latents * loop.init_noise_sigma
            noise = loop.draw_noise(latents, torch.Generator().manual_seed(seed + 1)) if loop.plan.stochastic else None
            with torch.no_grad():
                ref = loop64(latents.double(), noise=None if noise is None else noise.double())
                seq = loop(latents, noise=noise)
            floor = _rel(seq, ref)
            for accel, rule, tol in settings:
                y, st = parallel_sample(loop, latents, noise=noise, accel=accel, rule=rule, tol=tol)
                rows.append(Row(name, n, accel, rule, tol if tol is not None else 1e-6, st.evaluations,
                                st.sequential_steps, st.depth, st.step_evaluations, _rel(y, ref), _rel(y, seq),
                                floor, st.reason))
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| scheduler | steps | accel | rule | tol | rounds | seq. finish | depth | denoiser work (x L) "
            "| err vs fp64 | err vs fp32 | fp32 floor |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r.scheduler} | {r.steps} | {r.accel} | {r.rule} | {r.tol:g} | {r.rounds} | "
                   f"{r.sequential_steps} | {r.depth} | {r.step_evaluations} ({r.step_evaluations / r.steps:.1f}) | "
                   f"{r.err_fp64:.1e} | {r.err_fp32:.1e} | {r.floor:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_rounds", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="25 steps, DDIM only, two settings")
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    if a.quick:
        rows = measure(("ddim",), (25,), SETTINGS[1:5:3])
    else:
        rows = measure(tuple(a.schedulers.split(",")), tuple(int(s) for s in a.steps.split(",")))
    text = markdown(rows) + f"\n({time.time() - t0:.0f} s)\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
