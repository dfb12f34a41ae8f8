"""Tables read from the CSV rows: one per (model, device), speed-ups against eager and Inductor computed only
between rows of one run; the counts and the launch-bound GPU model's estimate; failures, skips, warnings."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .gpu_model import ASSUMPTIONS
from .output import PHASES, metric_name


def _num(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def latest_run(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of the most recent run (`date`) per device: what speed-ups may be computed from."""
    last: dict[str, str] = {}
    for r in rows:
        last[r["device"]] = max(last.get(r["device"], ""), r["date"])
    return [r for r in rows if r["date"] == last[r["device"]]]


def _label(provider: str, mode: str) -> str:
    return provider if mode in ("-", "default", "") else f"{provider}-{mode}"


def _g(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def tables(rows: Sequence[dict[str, str]], fmt: str = "github") -> str:
    """One table per (model, device): times, speed-ups against eager and inductor, compile, memory, iters, error."""
    from tabulate import tabulate

    out = []
    index: dict[tuple[str, ...], dict[str, str]] = {}
    order: dict[tuple[str, str], list[tuple[str, str]]] = {}
    flags: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for r in rows:
        key = (r["device"], r["model"])
        entry = (r["parameters"], _label(r["provider"], r["mode"]))
        if r["provider"] != "*":
            order.setdefault(key, [])
            if entry not in order[key]:
                order[key].append(entry)
        index[(r["device"], r["model"], r["parameters"], _label(r["provider"], r["mode"]), r["metric"])] = r
        if r["status"] in ("error", "skipped", "warning"):
            flags.setdefault((r["device"], r["model"], r["parameters"], _label(r["provider"], r["mode"])),
                             []).append(r)

    def val(dev, model, params, label, metric):
        r = index.get((dev, model, params, label, metric))
        return _num(r["median"]) if r and r["status"] in ("ok", "model") else None

    for (dev, model), entries in order.items():
        has_train = any(val(dev, model, p, lab, "forward_backward") is not None for p, lab in entries)
        table = []
        for params, label in entries:
            flagged = flags.get((dev, model, params, label), [])
            status = sorted({f"{r['metric']}: {r['status']}" for r in flagged if r["status"] != "warning"})
            warn = any(r["status"] == "warning" for r in flagged)
            line = [params, label]
            for phase in PHASES if has_train else PHASES[:1]:
                t = val(dev, model, params, label, phase)
                line.append(_g(t))
                for base in ("eager", "inductor"):
                    b = val(dev, model, params, base, phase)
                    line.append(f"{b / t:.2f}x" if t and b else "-")
            own = PHASES if has_train else PHASES[:1]
            comp = [val(dev, model, params, label, metric_name("compile", ph)) for ph in own]
            line.append("/".join(_g(c) for c in comp))
            mem = [val(dev, model, params, label, metric_name("peak_mem", ph)) for ph in own]
            line.append("/".join(_g(m) for m in mem))
            its = [val(dev, model, params, label, m) for m in
                   ((metric_name("iters", "forward"), metric_name("iters", "forward_backward", adjoint=True))
                    if has_train else (metric_name("iters", "forward"),))]
            fb = val(dev, model, params, label, metric_name("fallbacks", "forward"))
            line.append("/".join(_g(i) for i in its) + (f" (fb {fb:.0f})" if fb else ""))
            errs = [val(dev, model, params, label, m) for m in
                    (("max_rel_err", "max_rel_err_grad") if has_train else ("max_rel_err",))]
            line.append("/".join("-" if e is None else f"{e:.1e}" for e in errs))
            phases = PHASES if has_train else PHASES[:1]
            for metric, fmt_one in (("launches", "{:.0f}"), ("syncs", "{:.0f}"), ("gpu_est", "{:.3g}")):
                got = [val(dev, model, params, label, metric_name(metric, ph)) for ph in phases]
                line.append("/".join("-" if v is None else fmt_one.format(v) for v in got))
            host = val(dev, model, params, label, metric_name("host_overhead", "forward"))
            floor = val(dev, model, params, label, metric_name("host_floor", "forward"))
            line.append(f"{_g(host)} ({host / floor:.1f}x)" if host and floor else "-")
            line.append("; ".join(status) if status else ("ok, warned" if warn else "ok"))
            table.append(line)
        head = ["parameters", "provider", "fwd ms", "fwd vs eager", "fwd vs inductor"]
        if has_train:
            head += ["fwd+bwd ms", "fwd+bwd vs eager", "fwd+bwd vs inductor"]
        suffix = " fwd/train" if has_train else " fwd"
        head += ["compile s" + suffix, "peak MiB" + suffix, "iters" + (" fwd/adjoint" if has_train else " fwd"),
                 "max rel err" + (" out/grad" if has_train else " out"), "launches" + suffix, "syncs" + suffix,
                 "GPU est. ms (MODEL)" + suffix, "host ms fwd (x floor)", "status"]
        text = f"### {model} ({dev})\n\n" + tabulate(table, headers=head, tablefmt=fmt, disable_numparse=True)
        if any(val(dev, model, p, lab, metric_name("gpu_est", ph)) is not None for p, lab in entries for ph in PHASES):
            text += f"\n\nGPU est.: {ASSUMPTIONS}."
        out.append(text)
    return "\n\n".join(out)


def problems(rows: Sequence[dict[str, str]]) -> str:
    """Failures, skips and backend warnings, one line each."""
    lines = []
    for status, title in (("error", "Failures"), ("skipped", "Skipped"), ("warning", "Backend warnings")):
        sel = [r for r in rows if r["status"] == status]
        if not sel:
            continue
        lines.append(f"{title} ({len(sel)}):")
        if status == "skipped":  # the same reason for many cases: one line per (provider, reason)
            groups: dict[tuple[str, str], list[str]] = {}
            for r in sel:
                groups.setdefault((_label(r["provider"], r["mode"]), r["note"]), []).append(
                    f"{r['model']} [{r['parameters']}]")
            for (label, note), where in groups.items():
                lines.append(f"  {label}: {note} -- {len(where)} case(s): {', '.join(where[:3])}"
                             + (", ..." if len(where) > 3 else ""))
            continue
        for r in sel:
            lines.append(f"  {r['model']} [{r['parameters']}] {_label(r['provider'], r['mode'])} "
                         f"{r['metric']}: {r['note']}")
    return "\n".join(lines) if lines else "No failures."


