"""Writes an ``eval-router`` report: report.json, report.md, confusion.png and threshold.png.

Takes the report dict that ``eval.harness.run`` builds and only renders it: no metric is
computed here. matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HEADLINE = (
    ("accuracy", "accuracy"),
    ("in_scope_accuracy", "in-scope acc."),
    ("macro_f1", "macro-F1"),
    ("oos_recall", "OOS recall"),
    ("oos_precision", "OOS precision"),
    ("in_scope_acceptance", "in-scope accept."),
)


def write_all(out_dir: Path, report: dict[str, Any]) -> None:
    """Write the four report files into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    plot_confusion(report, out_dir / "confusion.png")
    plot_threshold(report, out_dir / "threshold.png")


def markdown(report: dict[str, Any]) -> str:
    """The report as a readable Markdown page."""
    routers = report["routers"]
    lines = ["# Router evaluation", ""]
    lines.append(f"test: `{report.get('test')}`; train: `{report.get('train')}`; val: `{report.get('val')}`; "
                 f"config: `{report.get('config')}`; created {report.get('created')}.")
    if report.get("benchmark"):
        b = report["benchmark"]
        lines.append(f"Benchmark {b['name']}: {b['shots']} shots per intent, {b['oos_train']} oos_train rows.")
    if report.get("calibrated_on_test"):
        lines.append("The threshold was calibrated on the scored rows themselves (no separate test split), so OOS "
                     "recall is read at the operating point where in-scope acceptance meets the target.")
    lines += ["", "| router | " + " | ".join(h for _, h in HEADLINE) + " | threshold | train s | p50 ms | p95 ms | msgs/s |",
              "|---" * (len(HEADLINE) + 6) + "|"]
    for name, r in routers.items():
        cells = [_pct(r.get(k)) for k, _ in HEADLINE]
        cells += [f"{r['threshold']:.3f}", f"{r['train_seconds']:.1f}", f"{r['latency_ms']['p50']:.1f}",
                  f"{r['latency_ms']['p95']:.1f}", _num(r.get("throughput_msgs_per_s"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    m = report.get("machine") or {}
    lines += ["", f"{m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch threads; load average before {m.get('loadavg_before')}, after "
                  f"{m.get('loadavg_after')} (a shared machine inflates timings)."]
    for name, r in routers.items():
        lines += ["", f"## {name}", ""]
        cal = r.get("calibration")
        if cal:
            lines.append(f"Threshold {cal['threshold']:.4f}: {cal['criterion']}; on the {cal['n_rows']} calibration rows "
                         f"acceptance {_pct(cal['in_scope_acceptance'])}, OOS recall {_pct(cal['oos_recall'])}"
                         + ("" if cal["feasible"] else " (target not reachable: threshold 0)") + ".")
        else:
            lines.append(f"Threshold {r['threshold']:.4f} from the config (no validation rows to calibrate on).")
        lines += ["", "| expert | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for e, s in r["per_expert"].items():
            lines.append(f"| {e} | {_pct(s['precision'])} | {_pct(s['recall'])} | {_pct(s['f1'])} | {s['support']} |")
        d = r["decisions"]
        lines += ["", "Decisions by source: " + ", ".join(f"{k} {v}" for k, v in sorted(d["by_source"].items())) + "."]
        if d["rules"]:
            lines += ["", "| rule | decisions | correct | precision |", "|---|---|---|---|"]
            for rule, s in d["rules"].items():
                lines.append(f"| {rule} | {s['count']} | {s['correct']} | {_pct(s['precision'])} |")
    return "\n".join(lines) + "\n"


def plot_confusion(report: dict[str, Any], path: Path) -> None:
    """One confusion matrix (counts, rows = true expert) per router."""
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay
    import numpy as np

    routers = report["routers"]
    n = len(routers)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    size = max(6.0, 0.55 * max(len(r["confusion"]["labels"]) for r in routers.values()) + 2)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, routers.items()):
        c = r["confusion"]
        ConfusionMatrixDisplay(np.asarray(c["matrix"]), display_labels=c["labels"]).plot(
            ax=ax, xticks_rotation=60, colorbar=False, values_format="d", cmap="Blues"
        )
        ax.set_title(f"{name}: accuracy {_pct(r['accuracy'])}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_threshold(report: dict[str, Any], path: Path) -> None:
    """OOS recall against in-scope acceptance as the threshold sweeps, one curve per router.

    Without out-of-scope rows there is no OOS recall: in-scope acceptance against the
    threshold is drawn instead. Routers without a sweep (no fallback configured) are left out.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    swept = {name: r for name, r in report["routers"].items() if r.get("sweep")}
    has_oos = any(v is not None for r in swept.values() for v in r["sweep"]["oos_recall"])
    for name, r in swept.items():
        s = r["sweep"]
        if has_oos:
            pts = [(a, o) for a, o in zip(s["in_scope_acceptance"], s["oos_recall"]) if a is not None and o is not None]
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
            if r.get("in_scope_acceptance") is not None and r.get("oos_recall") is not None:
                ax.scatter([r["in_scope_acceptance"]], [r["oos_recall"]], color=line.get_color(), s=80, zorder=3,
                           edgecolors="black", label=f"{name} at threshold {r['threshold']:.3f}")
        else:
            ax.plot(s["threshold"], s["in_scope_acceptance"], label=name)
    if has_oos:
        ax.set_xlabel("in-scope acceptance")
        ax.set_ylabel("OOS recall")
        ax.set_title("OOS recall vs in-scope acceptance (threshold sweep)")
    else:
        ax.set_xlabel("threshold")
        ax.set_ylabel("in-scope acceptance")
        ax.set_title("in-scope acceptance vs threshold (no out-of-scope rows)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"
