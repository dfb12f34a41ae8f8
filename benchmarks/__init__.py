"""Benchmarks of the `deeppcr` torch.compile backend against eager PyTorch and Inductor.

    python -m benchmarks run --suite {mlp,resnet,diffusion,all} [--quick] [--device {cpu,cuda}] [--out DIR]
    python -m benchmarks plot OUT/results.csv --out OUT/plots
    python -m benchmarks table OUT/results.csv

Layout (after Liger-Kernel's `benchmark/`): `suites` holds one setup function per model and the grids of
parameters; `harness` runs every provider on the same workload and inputs, measures, and appends tidy rows
to a CSV; `plots` draws PNGs from that CSV only. `RESULTS.md` keeps the latest measured tables.
"""

__all__ = ["harness", "plots", "suites"]
