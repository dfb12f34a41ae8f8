"""PNG plots drawn from the benchmark CSV alone (never from in-memory results).

- Layer stacks (deep_mlp, residual_mlp, conv_resnet): speed-up of each compiled provider against eager
  and against Inductor, over the number of layers / blocks, one line per width (as DeepPCR's Figure 3
  plots it) and one figure per (metric, remaining parameters, e.g. batch).
- Samplers (ddim_mlp, unet_ddim): forward time against the number of steps, one line per provider.

Only rows with status "ok" of the latest run per device are used, so ratios never mix runs.

    python -m benchmarks plot bench_out/results.csv --out bench_out/plots
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .output import PHASES, read_csv
from .tables import latest_run

# model -> (x axis parameter, parameter drawn as separate lines or None)
AXES = {
    "deep_mlp": ("layers", "width"),
    "residual_mlp": ("blocks", "width"),
    "conv_resnet": ("blocks", "channels"),
    "ddim_mlp": ("steps", None),
    "unet_ddim": ("steps", None),
}
SAMPLERS = ("ddim_mlp", "unet_ddim")
BASELINES = ("eager", "inductor")


def _params(s: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in s.split(",") if "=" in kv)


def _label(r: dict[str, str]) -> str:
    return r["provider"] if r["mode"] in ("-", "default", "") else f"{r['provider']}-{r['mode']}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def _device_slug(device: str) -> str:
    return device.split(":", 1)[0]


def _times(rows: Sequence[dict[str, str]], metric: str) -> dict[tuple[str, str, str, str], float]:
    """(device, model, parameters, provider label) -> median time of `metric`, status ok only."""
    out = {}
    for r in rows:
        if r["metric"] == metric and r["status"] == "ok" and r["median"]:
            out[(r["device"], r["model"], r["parameters"], _label(r))] = float(r["median"])
    return out


def plot_csv(csv_path: Path | str, out_dir: Path | str) -> list[Path]:
    """Draw every plot the CSV supports into `out_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_run(read_csv(csv_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    for metric in PHASES:
        times = _times(rows, metric)
        # group: (device, model, other parameters) -> [(x, line value, label, time)]
        groups: dict[tuple[str, str, str], list[tuple[int, str, str, float]]] = defaultdict(list)
        for (dev, model, params, label), t in times.items():
            xname, line = AXES.get(model, (None, None))
            p = _params(params)
            if xname is None or xname not in p:
                continue
            rest = ",".join(f"{k}={v}" for k, v in p.items() if k not in (xname, line))
            groups[(dev, model, rest)].append((int(p[xname]), p.get(line, "") if line else "", label, t))

        for (dev, model, rest), pts in sorted(groups.items()):
            xname, line = AXES[model]
            if model in SAMPLERS:
                fig, ax = plt.subplots(figsize=(6, 4.2))
                for label in sorted({q[2] for q in pts}):
                    xs = sorted((x, t) for x, _, lab, t in pts if lab == label)
                    ax.plot([x for x, _ in xs], [t for _, t in xs], marker="o", label=label)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(xname)
                ax.set_ylabel(f"{metric} time (ms, median)")
                ax.set_title(f"{model} {rest} [{_device_slug(dev)}]", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
                name = f"{model}_{metric}_time_{_slug(rest)}_{_device_slug(dev)}.png"
            else:
                base = {(x, lv, lab): t for x, lv, lab, t in pts}
                compiled = sorted({lab for _, _, lab, _ in pts if lab not in ("eager",)})
                fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
                drew = False
                for ax, baseline in zip(axes[0], BASELINES, strict=True):
                    for i, lab in enumerate(c for c in compiled if c != baseline):
                        style = ["-", "--", ":", "-."][i % 4]
                        for j, lv in enumerate(sorted({q[1] for q in pts}, key=lambda s: (len(s), s))):
                            xs = sorted({x for x, v, lb, _ in pts if v == lv and lb == lab})
                            ys = [(x, base[(x, lv, baseline)] / base[(x, lv, lab)]) for x in xs
                                  if (x, lv, baseline) in base and base[(x, lv, lab)] > 0]
                            if not ys:
                                continue
                            drew = True
                            ax.plot([x for x, _ in ys], [y for _, y in ys], linestyle=style, marker="o",
                                    color=f"C{j}", label=f"{lab}" + (f", {line}={lv}" if line else ""))
                    ax.axhline(1.0, color="grey", linewidth=0.8)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xlabel(xname)
                    ax.set_ylabel(f"speed-up vs {baseline} (x)")
                    ax.set_title(f"{model} {metric} vs {baseline}, {rest} [{_device_slug(dev)}]", fontsize=9)
                    ax.grid(True, which="both", alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
                if not drew:
                    plt.close(fig)
                    continue
                name = f"{model}_{metric}_speedup_{_slug(rest)}_{_device_slug(dev)}.png"
            fig.tight_layout()
            path = out / name
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
