"""Step 2 of the finder: candidate periods (tandem repeats of the signature sequence) and the phase of the block
boundary that minimises the carried values."""

from __future__ import annotations

import itertools
from collections import Counter

from torch.fx import Node

from ..fx_utils import is_tensor_node, node_value

# Candidate periods from the distances to the r-th next equal signature, r <= MULTIPLE_REPEATS: a step that
# evaluates one sub-module several times (an RK4 step calls its vector field 4 times, midpoint, Heun and
# leapfrog twice) repeats with the inner period inside and the step's period outside; the step's period is
# the distance to the 2nd..r-th next equal signature of the nodes in the inner repeat.
MULTIPLE_REPEATS = 8


def _periodic_regions(sig_ids: list[int], p: int, min_length: int) -> list[tuple[int, int, int]]:
    """(p, start, end) of the maximal regions [start, end) where sig[j] == sig[j + p], at least min_length
    blocks of p long. Plain Python (no tensors: this runs inside whatever device or fake-tensor mode the
    caller has set)."""
    runs, j = [], 0
    for same, group in itertools.groupby(a == b for a, b in zip(sig_ids, itertools.islice(sig_ids, p, None))):
        n = sum(1 for _ in group)
        if same and (n + p) // p >= min_length:  # region [j, j + n + p): every block of p repeats the previous
            runs.append((p, j, j + n + p))
        j += n
    return runs


def _candidate_runs(sig_ids: list[int], min_length: int,
                    max_periods: int = 32) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(period, start, end) of maximal regions [start, end) where sig[j] == sig[j + period], as two lists:
    periods that are the distance to the next equal signature, and periods that are only the distance to
    the 2nd..MULTIPLE_REPEATS-th next one (multiples of an inner repeat; tried where the first found
    nothing). O(N * MULTIPLE_REPEATS) to count the distances, O(N) per period to find the regions."""
    N = len(sig_ids)
    upcoming: dict[int, list[int]] = {}  # signature -> its next occurrences after j, nearest first
    near, far = Counter(), Counter()
    for j in range(N - 1, -1, -1):
        s = sig_ids[j]
        nxt = upcoming.setdefault(s, [])
        if nxt:
            near[nxt[0] - j] += 1
            for k in nxt[1:]:
                far[k - j] += 1
        nxt.insert(0, j)
        if len(nxt) > MULTIPLE_REPEATS:
            nxt.pop()
    need = max(1, min_length - 1)
    first = [p for p, c in near.most_common(max_periods) if c >= need]
    seen = set(first)
    multiples = [p for p, c in far.most_common() if c >= need and p not in seen][:max_periods]
    return ([r for p in first for r in _periodic_regions(sig_ids, p, min_length)],
            [r for p in multiples for r in _periodic_regions(sig_ids, p, min_length)])


def _best_phase(seq: list[Node], p: int, a: int, end: int, min_length: int) -> int:
    """Block-boundary offset in [0, p) with the fewest carried values that cannot be states (not floating
    tensors: a tuple such as an LSTM cell's (h, c) result), then the fewest values read from two blocks
    back (which no chain can carry: a boundary that puts a carried copy (`passes/carry.py`) in the wrong
    block), then the fewest carried values; ties go to the earliest."""
    best, best_cost = 0, None
    for phi in range(p):
        if (end - a - phi) // p < min_length:
            break
        A = set(seq[a + phi: a + phi + p])
        B = seq[a + phi + p: a + phi + 2 * p]
        before = set(seq[max(a, a + phi - p): a + phi])  # the run's nodes in the block before A
        carried = {x for n in B for x in n.all_input_nodes if x in A}
        far = {x for n in B for x in n.all_input_nodes if x in before}
        unfit = sum(not (is_tensor_node(x) and node_value(x).is_floating_point()) for x in carried)
        cost = (unfit, len(far), len(carried))
        if best_cost is None or cost < best_cost:
            best, best_cost = phi, cost
    return best
