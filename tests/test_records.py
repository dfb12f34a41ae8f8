"""pcr_compile/runtime/records.py: solve records reach every open collector, from any thread, and no other."""

from __future__ import annotations

import threading

from pcr_compile import SolveRecord, record_solves
from pcr_compile.runtime.records import emit, emit_solve
from pcr_compile.solver import SolveStats


def _record(name: str) -> SolveRecord:
    return SolveRecord(chain=name, length=4, iterations=2, residual=1e-9, converged=True, fell_back=False,
                       direction="forward")


def test_nested_collectors_each_see_what_ran_while_they_were_open():
    emit(_record("before"))  # no collector open: dropped
    with record_solves() as outer:
        emit(_record("a"))
        with record_solves() as inner:
            emit(_record("b"))
        emit(_record("c"))
    emit(_record("after"))
    assert [r.chain for r in outer] == ["a", "b", "c"]
    assert [r.chain for r in inner] == ["b"]


def test_two_equal_collectors_close_by_identity():
    with record_solves() as first:
        with record_solves() as second:  # both empty: equal lists, distinct collectors
            pass
        emit(_record("x"))
    assert [r.chain for r in first] == ["x"] and second == []


def test_records_from_another_thread_are_collected():
    with record_solves() as solves:
        t = threading.Thread(target=lambda: emit(_record("thread")))
        t.start()
        t.join()
    assert [r.chain for r in solves] == ["thread"]


def test_emit_solve_copies_every_statistic():
    stats = SolveStats(iterations=3, residual=2e-7, converged=False, fell_back=True, prefix=5,
                       residuals=[1.0, 1e-3, 2e-7], reason="max_iters", evaluations=4, sequential_steps=7)
    with record_solves() as solves:
        emit_solve("chain_x", 12, "backward", "diagonal", stats, 0.25)
    [r] = solves
    assert (r.chain, r.length, r.direction, r.jacobian, r.seconds) == ("chain_x", 12, "backward", "diagonal", 0.25)
    assert (r.iterations, r.residual, r.converged, r.fell_back, r.prefix) == (3, 2e-7, False, True, 5)
    assert r.residuals == (1.0, 1e-3, 2e-7) and r.reason == "max_iters"
    assert (r.evaluations, r.sequential_steps) == (4, 7)
