"""pcr_compile: a torch.compile backend that solves chains of repeated computation in parallel.

    torch.compile(model, backend="deeppcr", options={...})

Public API: :func:`explain`, :func:`record_solves`, :class:`Options`, :class:`SolveRecord`,
:class:`StackedLayers` (identical layers held with stacked parameters: the cheapest form to compile).
"""

from .options import Options
from .runtime.records import SolveRecord, record_solves
from .stacking import StackedLayers

__version__ = "0.1.0"
__all__ = ["Options", "SolveRecord", "StackedLayers", "record_solves", "explain", "__version__"]


def __getattr__(name):  # explain pulls in torch._dynamo: import it on first use only
    if name == "explain":
        from .api import explain

        return explain
    raise AttributeError(f"module 'pcr_compile' has no attribute {name!r}")
