"""Backend options: parsed once into a frozen dataclass; unknown keys and bad values are errors."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields, replace

from .kernels import IMPLS

MODES = ("auto", "parallel", "sequential")
JACOBIANS = ("auto", "dense", "diagonal", "identity", "zero")
KERNELS = IMPLS  # the kernels option takes the kernels package's impl values
SAMPLER_JACOBIANS = ("auto", "scalar", "identity")  # pcr_compile.solver.sampler.JACOBIANS, the default first
INT_OPTIONS = {"max_iters": 0, "min_chain_length": 2, "window": 0, "dense_budget": 1}  # each with its least value


def inductor_modes() -> tuple[str, ...]:
    """The modes this torch's Inductor accepts (`torch.compile(mode=...)`)."""
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())


@dataclass(frozen=True)
class Options:
    """Options of `torch.compile(model, backend="deeppcr", options={...})`.

    mode: "auto" (a cost model decides per chain), "parallel" (solve every chain found in parallel),
        "sequential" (find chains, rewrite none: the same code as Inductor).
    tol: tolerance of every step's residual relative to that step's own size, row by row
        (|z_l - f_l(z_{l-1})| <= tol * |f_l(z_{l-1})|; solver/residual.py); None: by dtype
        (float64 1e-10, float32 1e-6, float16 2e-3, bfloat16 1e-2; at least bfloat16 2e-3 / float16 2.4e-4
        for steps that compute in that dtype under torch.autocast).
    max_iters: Newton / Picard iterations (per window length of progress) before finishing sequentially from the
        converged prefix; 0: sequential evaluation at once.
    min_chain_length: shorter repeats are left alone.
    jacobian: "auto" (by block structure and state size), "dense", "diagonal", "identity", "zero".
    window: steps iterated at a time, in every chain (a sliding window, as ParaDiGMS; 0: the whole chain; a window
        longer than the chain is the whole chain).
    sampler_jacobian: the update of a sampler chain solved matrix-free (jacobian "identity": a large state, or
        forced; pcr_compile/solver/sampler.py, full window): "auto" (the default, as `parallel_sample`: scalar
        Newton and Picard + Anderson raced side by side for the first rounds, then the one whose step
        residuals fell further kept), "scalar" (Newton with each step's secant-measured scalar Jacobian),
        "identity" (Picard with triangular Anderson mixing).
    dense_budget: largest dense Jacobian (elements, L * B * w * w) "auto" may materialise.
    kernels: linear-recurrence kernels: "auto" (Triton on CUDA, PyTorch otherwise), "triton", "torch".
    strict: re-raise internal errors instead of falling back to Inductor on the original graph.
    inductor_mode: the Inductor mode that compiles the rest of the graph ("max-autotune", ...; None:
        Inductor's default). `torch.compile(..., backend="deeppcr", mode=M)` sets it too (torch.compile
        takes `mode` or `options`, not both). Graphs holding a chain op are never captured as CUDA graphs.
    process_group: None, "world" or a name registered with `pcr_compile.distributed.register_process_group`:
        dense chains are solved layer-parallel across that group's ranks (pcr_compile/distributed/chain_op.py).
    """

    mode: str = "auto"
    tol: float | None = None
    max_iters: int = 50
    min_chain_length: int = 8
    jacobian: str = "auto"
    window: int = 0
    sampler_jacobian: str = "auto"
    dense_budget: int = 1 << 26
    kernels: str = "auto"
    strict: bool = False
    inductor_mode: str | None = None
    process_group: str | None = None

    @classmethod
    def parse(cls, options: dict | Options | None) -> Options:
        if options is None:
            return cls()
        if isinstance(options, Options):  # made directly, so never checked
            options.check()
            return options
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known, key=str)  # keys of any type: the message must not fail to sort them
        if unknown:
            raise ValueError(f"unknown deeppcr option(s) {unknown}; accepted options: {sorted(known)}")
        o = cls(**options)
        o.check()
        # numbers of other types that passed (numpy's float32 / int64, say) are held as Python numbers
        ints = {k: int(getattr(o, k)) for k in INT_OPTIONS}
        return replace(o, tol=None if o.tol is None else float(o.tol), **ints)

    def check(self) -> None:
        def bad(key, accepted):
            raise ValueError(f"deeppcr option {key!r} must be {accepted}, got {getattr(self, key)!r}")

        if self.mode not in MODES:
            bad("mode", f"one of {MODES}")
        if self.jacobian not in JACOBIANS:
            bad("jacobian", f"one of {JACOBIANS}")
        if self.sampler_jacobian not in SAMPLER_JACOBIANS:
            bad("sampler_jacobian", f"one of {SAMPLER_JACOBIANS}")
        if self.kernels not in KERNELS:
            bad("kernels", f"one of {KERNELS}")
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real)
                                     or not 0 < self.tol < 1):
            bad("tol", "None or a number in (0, 1)")
        for key, lo in INT_OPTIONS.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                bad(key, f"an int >= {lo}")
        if not isinstance(self.strict, bool):
            bad("strict", "a bool")
        if self.process_group is not None and not isinstance(self.process_group, str):
            bad("process_group", "None, 'world' or a name registered with register_process_group")
        if self.inductor_mode is not None and self.inductor_mode not in inductor_modes():
            bad("inductor_mode", f"None or one of {inductor_modes()}")

    def as_dict(self) -> dict:
        return asdict(self)
