"""Benchmarks of the `deeppcr` torch.compile backend against eager PyTorch and Inductor.

    python -m benchmarks run --suite {mlp,resnet,diffusion,all} [--quick] [--device {cpu,cuda}] [--out DIR]
    python -m benchmarks plot OUT/results.csv --out OUT/plots
    python -m benchmarks table OUT/results.csv

Layout (after Liger-Kernel's `benchmark/`): `suites` holds one setup function per model and the grids of
parameters; `providers` the ways to run them (eager, Inductor, deeppcr); `harness` runs every provider on
the same workload and inputs; `measuring` measures one phase (with the one timer of `timing` and the
launch / host-sync counts of `counting`, and the launch-bound GPU estimate of `gpu_model`, a model);
`output` writes tidy rows of one CSV schema (shared with `kernel_bench.py`); `tables` and `plots` read that
CSV only. `overhead` measures the host overhead per call, `default_mode` the default options' compile
overhead against Inductor. `RESULTS.md` keeps the latest measured tables.
"""

__all__ = ["harness", "measuring", "output", "plots", "providers", "suites", "tables", "timing"]
