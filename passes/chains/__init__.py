"""Finding chains of repeated computation in a Dynamo FX graph. Analysis only: nothing here mutates.

A *chain* is a maximal run of L structurally identical blocks of nodes, where block i+1 reads block i's
outputs (the carried state) and otherwise only its own inputs (per-step: layer parameters, per-step
tensors), inputs shared by every block (loop-invariant), and constants (equal in every block, or lifted
to per-step inputs when they differ, as a sampler's timestep and schedule coefficients do).

Dynamo unrolls Python loops, so a `for layer in self.layers` arrives as the same node sequence repeated.
The finder works in three steps:

1. every compute node gets a structural signature (op, target, argument structure with nodes and
   numbers abstracted, output shape and dtype); repeats of the signature sequence with period p are
   found from the distances between equal signatures (tandem repeats): to the next equal one, and, tried
   where those find no chain, to the 2nd..8th next one (a step that evaluates one sub-module several
   times, as an RK4 step its vector field, repeats with the inner period inside the step's own);
2. for each repeat, the phase of the block boundary minimising the carried tensors is chosen;
3. the candidate is validated: every block must reference the same positions of its own block and of the
   previous one; the first block's references to the previous block are the initial state. A
   violation splits the run (the longest valid pieces stay candidates), and ineligible ops (randomness,
   in-place mutation, side effects) decline it. Declined candidates are returned with their reasons.
   Values of earlier steps used after the chain (every layer's output collected in a list, an RNN's
   per-step outputs) are recorded as `exposed`: the rewrite reads them from the solved trajectory.

Stages, a module each: ``signatures.py`` (1), ``periods.py`` (candidate periods and phases, 2),
``validate.py`` (3, in named steps), ``eligibility.py`` (which ops may run out of order), ``finder.py`` (the
search over candidates and the report of the declined), ``kinds.py`` (what kind of loop a chain is); the typed
results are in ``match.py``.

Prior art: `torch/_dynamo/graph_region_tracker.py` (repeated regions), `torch/fx/passes/utils/matcher_utils.py`.
"""


from .eligibility import body_structure, ineligibility, inlinable_body
from .finder import find_chains
from .kinds import chain_kind
from .match import REF_KINDS, Analysis, ArgRef, ChainMatch, Declined, IntegerRun, LaggedRun
from .signatures import node_signature

__all__ = ["REF_KINDS", "Analysis", "ArgRef", "ChainMatch", "Declined", "IntegerRun", "LaggedRun", "body_structure",
           "chain_kind", "find_chains", "ineligibility", "inlinable_body", "node_signature"]
