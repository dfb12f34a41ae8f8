"""The residual of a chain solve and its stopping rule: one definition for every solver path.

A chain is `z_l = f_l(z_{l-1})`, l = 1..L, on packed states `(L, B, w)`: L steps, B rows (samples), w
features. For a guess `Z` with `F_l = f_l(Z_{l-1})` the residual is `r = Z - F` and the *step residual*

    rho_l = max_b  max_i |r_{l,b,i}|  /  max(max_i |F_{l,b,i}|, tiny)            (tiny: finfo(dtype).tiny)

is each step's residual relative to that step's own size, row by row (NaN counts as inf). The solve
accepts step l when `rho_l <= tol`, the converged prefix is the leading accepted steps, and the solve has
converged when every step is accepted. The same rule, with `F` the evaluated right-hand side
`c_m + J_{m+1}^T lam_{m+1}`, holds for the adjoint. The fused Newton kernels (`triton_newton.py`) compute
the same ratio per (step, row) on the device.

Why per step and per row, and what it guarantees. A guess that passes is the *exact* trajectory of the
chain with every step perturbed, `z_l = f_l(z_{l-1}) + r_l`, `|r_{l,b}| <= tol |f_l(z_{l-1})_b|`: a
backward error of at most `tol` of each step's own size, the kind of guarantee floating-point evaluation
itself gives with `tol` = the unit roundoff u. The error against sequential evaluation follows by
linearising, `e_l = J_l e_{l-1} + r_l`:

    e_l = sum_{m <= l} J_l J_{l-1} ... J_{m+1} r_m

the residuals propagated by the Jacobian products. Eager's own rounding errors `delta_m`, with
`|delta_m| ~ u |z_m|`, propagate through the same products, so the parallel result's error is at most
about `tol / u` times sequential evaluation's own, at every scale, whatever the products do. Where the
products follow the state's size (`|J_l ... J_{m+1}| ~ |z_l| / |z_m|`: positively homogeneous layers,
bias-free ReLU or linear chains, any chain in its linear range) the relative error of step l is at most
`l * tol`. A rule that measures residuals against the chain's *largest* step (`max_l |F_l|`) instead lets
the errors of steps far smaller than the largest grow unseen: chains whose activations shrink or grow by
more than `1/tol` came back wrong and "converged" under it.

Diffusion samplers may stop on a second, clearly weaker rule instead, `sigma_residuals` (ParaDiGMS): the
step's defect against the noise level the scheduler leaves at that step, not against the state's size.
It is opt-in (`pcr_compile.diffusion`, `rule="sigma"`) and never the default.
"""

from __future__ import annotations

import torch

from pcr_compile.kernels import settings


def tiny(dtype: torch.dtype) -> float:
    """The floor of a step's scale: the smallest normal number of `dtype` (a row whose `F` is exactly zero
    is accepted only when its residual is exactly zero)."""
    return torch.finfo(dtype).tiny


def step_residuals(r: torch.Tensor, F: torch.Tensor, parts: list[int] | None = None) -> torch.Tensor:
    """`rho_l` for every step: `(L,)` from `r`, `F` of shape `(L, B, w)` (rows are dim 1, features the
    last dim; `(L, w)` is one row per step). `parts` splits the features into the carried tensors they pack
    (an LSTM's `h` and `c`, say): each is measured against its own size, so a small state beside a large
    one is held to its own scale too. NaN residuals give inf."""
    L = r.shape[0]
    if r.numel() == 0:
        return torch.zeros(L, dtype=r.dtype, device=r.device)
    rows = r.reshape(L, r.shape[1], -1) if r.dim() >= 3 else r.reshape(L, 1, -1)
    Fr = F.reshape(rows.shape)
    if parts is not None and len(parts) > 1:
        pieces = zip(rows.split(parts, dim=-1), Fr.split(parts, dim=-1))
    else:
        pieces = [(rows, Fr)]
    rho = None
    for rp, fp in pieces:
        scale = fp.abs().amax(-1).clamp_min(tiny(F.dtype))  # (L, B)
        ratio = (rp.abs().amax(-1) / scale).amax(-1)  # (L,)
        rho = ratio if rho is None else torch.maximum(rho, ratio)
    return torch.where(torch.isnan(rho), torch.full_like(rho, float("inf")), rho)


def sigma_residuals(r: torch.Tensor, sigma: torch.Tensor, parts: list[int] | None = None) -> torch.Tensor:
    """The second stopping rule, for diffusion samplers only: each step's residual against the sampler's own
    noise level (ParaDiGMS, Shih et al. 2023, Sec. 3.3), `(L,)` from `r` `(L, B, w)` and `sigma` `(L,)`:

        rho_l = max_b  sqrt(mean_i r_{l,b,i}^2)  /  sigma_l                    (NaN counts as inf)

    `r` is the step's defect `z_l - f_l(z_{l-1})` (under Picard, the update the next round makes) and
    `sigma_l` the standard deviation of the noise the step's output still carries (`sigma_floor`ed by the
    caller where it is zero, as at a sampler's last step). Accepting `rho_l <= tol` perturbs each step by
    at most `tol` of the noise already present, which is what a sampler's output is judged by, not by the
    exact rule's backward error of `tol` of the state's size (`step_residuals`). It gives no bound relative to
    sequential evaluation: the final error is whatever these perturbations become through the remaining steps
    (README: rounds against final error for both rules). `parts` as in `step_residuals`."""
    L = r.shape[0]
    if r.numel() == 0:
        return torch.zeros(L, dtype=r.dtype, device=r.device)
    rows = r.reshape(L, r.shape[1], -1) if r.dim() >= 3 else r.reshape(L, 1, -1)
    pieces = rows.split(parts, dim=-1) if parts is not None and len(parts) > 1 else [rows]
    rms = torch.stack([p.pow(2).mean(-1).sqrt() for p in pieces]).amax(0).amax(-1)  # (L,)
    rho = rms / sigma.to(rms)
    return torch.where(torch.isnan(rho), torch.full_like(rho, float("inf")), rho)


def host_values(t: torch.Tensor) -> list:
    """`t.tolist()`, counted (`kernels.settings.to_host`): every device-to-host read of the solver goes
    through here, so that benchmarks can count host syncs on the CPU too."""
    return settings.to_host(t)


def all_finite(tensors) -> bool:
    """Whether every floating tensor is finite, in one host read."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not flags or bool(host_values(torch.stack(flags).all()))
