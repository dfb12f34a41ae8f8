"""A launch-bound GPU estimate computed from launch and host-sync counts (`counting.py`). A MODEL, NOT A
MEASUREMENT: no GPU ran it.

    estimate_ms = launches x LAUNCH_US + syncs x SYNC_US

It assumes that every kernel is short enough for the host's launch cost to dominate (true of the small
per-layer kernels of deep narrow chains, the case deeppcr exists for), that launches do not overlap with
each other or with host work, and that the device work itself (FLOPs, bytes moved) is free; it ignores CUDA
graphs, which remove most of the launch cost where a graph can be captured (a chain op cannot:
`cudagraph_unsafe`). The two costs are ASSUMPTIONS for PyTorch eager on an H200 (about 4 us of host time per
kernel launch through the dispatcher; about 10 us per device-to-host sync: a copy, the stream drained and the
host woken), not measured here; change them in one place, below. Every estimate row and table prints
`ASSUMPTIONS` beside the figure.
"""

from __future__ import annotations

LAUNCH_US = 4.0  # assumed host cost of one kernel launch (PyTorch eager, H200): an assumption
SYNC_US = 10.0  # assumed cost of one host sync (device-to-host read, stream drained): an assumption

ASSUMPTIONS = (f"MODEL, not measured: launches x {LAUNCH_US:g} us + host syncs x {SYNC_US:g} us "
               "(assumed per-launch and per-sync costs of PyTorch eager on an H200; device work, bytes, overlap "
               "and CUDA graphs ignored)")


def estimate_ms(launches: int, syncs: int) -> float:
    """The launch-bound time of one call, in ms, under the assumptions above."""
    return (launches * LAUNCH_US + syncs * SYNC_US) / 1e3
