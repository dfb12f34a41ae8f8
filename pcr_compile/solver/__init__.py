"""The host-side solver of a chain op call: the Newton / quasi-Newton / Picard drivers, the adjoint refinement,
windows, the fallback ladder and the one stopping rule. Imports nothing above ``kernels/`` and ``passes/``
besides the run-time records it emits.

The route of one call, file by file:

- ``forward.py`` / ``adjoint.py``: :func:`run_forward` and :func:`run_backward`, what the chain op and its adjoint
  op (``pcr_compile/runtime/ops.py``) call. They build one :class:`~call.ChainCall` and pick the path: the fused
  kernels (``fused.py``), the general driver (``newton.py``), or sequential evaluation; ``auto_switch.py`` keeps
  a chain whose solve did not pay sequential (mode="auto").
- ``call.py``: :class:`ChainSpec` (what the rewrite registers), ``Layout`` (states packed into ``(B, w)``) and
  ``ChainCall`` (the template evaluated over all steps at once with ``vmap``, its Jacobians, one step alone).
- ``newton.py``: the iteration over the whole trajectory, committing only verified prefixes, and the adjoint's
  refinement; each linear system goes to ``pcr_compile.kernels.linear_recurrence`` (PCR).
- ``fused.py``: Newton for linear + pointwise chains in closed form (``pcr_compile.kernels.triton_newton``).
- ``residual.py``: the one residual and stopping rule, and every host read the solver makes.
"""

from .adjoint import run_backward
from .auto_switch import SWITCH_FRACTION, switched
from .call import ChainCall, ChainSpec, Layout
from .forward import run_forward
from .fused import NewtonResult, newton_linear_pointwise
from .newton import SolveStats, default_tol

__all__ = ["ChainCall", "ChainSpec", "Layout", "NewtonResult", "SWITCH_FRACTION", "SolveStats", "default_tol",
           "newton_linear_pointwise", "run_backward", "run_forward", "switched"]
