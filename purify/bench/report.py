"""Benchmark outputs: ``summary.json``, ``summary.md``, ``summary.csv``, ``frontier.png`` and ``env.json``.

All files are written atomically. The markdown table and the plot are generated from the summary, never edited
by hand.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from purify.lineage import atomic_write_text, git_sha, versions


def environment(seeds: list[int], wall_seconds: float, command: str) -> dict[str, Any]:
    """Machine, versions, seeds, git sha and wall time of a benchmark run."""
    return {
        "command": command,
        "seeds": seeds,
        "wall_seconds": round(wall_seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": platform.machine() or platform.processor(),
                    "cpus": os.cpu_count(), "gpu": _gpu_name()},
        "versions": versions(),
        "git": git_sha(Path(__file__).resolve().parent),
    }


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("n", 1) == 0:
        return "–"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(summary: dict[str, Any], columns: list[tuple[str, str]], notes: list[str]) -> str:
    """A table a reader takes in at a glance: one row per condition, mean [95% CI], and the frontier verdict."""
    head = ["condition", *[title for _, title in columns], "gap to vanilla frontier", "verdict"]
    lines = [f"# {summary['suite']} ({summary.get('protocol', '')})", "",
             f"Seeds: {summary['seeds']} — mean [95% CI] over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cond in summary["conditions"].items():
        gap = summary.get("frontier_gap", {}).get(name)
        row = [name, *[_fmt(cond.get(key)) for key, _ in columns], _fmt(gap),
               summary.get("verdicts", {}).get(name, "")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + [""] + notes) + "\n"


def csv_rows(summary: dict[str, Any]) -> str:
    """One row per seed × condition × point (final points have ``point=final``)."""
    buf = io.StringIO()
    keys = ["transfer", "task_error", "fidelity_kl", "agreement", "accuracy", "distance_to_control"]
    writer = csv.writer(buf)
    writer.writerow(["condition", "seed", "point", "step", *keys])
    for name, cond in summary["conditions"].items():
        for rec in cond.get("per_seed", []):
            writer.writerow([name, rec["seed"], "final", rec.get("step", ""), *[rec.get(k, "") for k in keys]])
            for pt in rec.get("curve", []):
                writer.writerow([name, rec["seed"], "curve", pt.get("step", ""), *[pt.get(k, "") for k in keys]])
    return buf.getvalue()


def plot_frontier(summary: dict[str, Any], path: Path, xkey: str = "task_error", xlabel: str = "task error") -> None:
    """Transfer against ``xkey``: vanilla's mean early-stopping curve with its CI band, one marker per condition
    (final point, 95% CI bars) and one line per purifier's knob sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6))
    curve = summary.get("frontier", {}).get("vanilla", [])
    if curve:
        xs = [p[xkey] for p in curve]
        ax.plot(xs, [p["transfer"] for p in curve], "-", color="black", label="vanilla (early-stopping curve)")
        ax.fill_between(xs, [p["transfer_ci95"][0] for p in curve], [p["transfer_ci95"][1] for p in curve],
                        color="black", alpha=0.12, lw=0)
    cmap = plt.get_cmap("tab20")
    groups: dict[str, list[tuple[float, float]]] = {}
    for i, (name, cond) in enumerate(summary["conditions"].items()):
        if xkey not in cond or "transfer" not in cond:
            continue
        x, y = cond[xkey], cond["transfer"]
        color = "black" if name == "vanilla" else cmap(i % 20)
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o", ms=5, color=color,
                    capsize=2, label=name)
        groups.setdefault(name.split("@")[0], []).append((x["mean"], y["mean"]))
    for pts in groups.values():
        if len(pts) > 1:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", color="gray", lw=0.8)
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.set_xlabel(f"{xlabel} (lower = better fidelity)")
    ax.set_ylabel("trait transfer (0 = none, 1 = teacher's)")
    ax.set_title(f"{summary['suite']} ({summary.get('protocol', '')}): transfer vs fidelity, {len(summary['seeds'])} seeds")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out_dir: str | Path, summary: dict[str, Any], env: dict[str, Any], columns: list[tuple[str, str]],
                 notes: list[str], xkey: str = "task_error", xlabel: str = "task error") -> Path:
    """Write every output file of a benchmark run into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    atomic_write_text(out / "summary.md", markdown(summary, columns, notes))
    atomic_write_text(out / "summary.csv", csv_rows(summary))
    atomic_write_text(out / "env.json", json.dumps(env, indent=2) + "\n")
    plot_frontier(summary, out / "frontier.png", xkey, xlabel)
    return out
