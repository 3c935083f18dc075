"""Benchmark outputs: ``summary.json``, ``summary.md``, ``summary.csv``, ``frontier.png`` and ``env.json``.

All files are written atomically. The markdown table and the plot are generated from the summary, never edited
by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from purify.bench.stats import mean_curve
from purify.lineage import atomic_write_text, git_sha, versions
from purify.purifiers.checks import purifier_problems
from purify.storage import atomic_path, atomic_write_json, jsonable  # noqa: F401 - jsonable: re-exported


class BenchError(ValueError):
    """A bad benchmark request (one ``purify: error:`` line)."""


def check_conditions(arms: Iterable[tuple[str, Sequence[Any], Sequence[str], dict[str, Any]]]) -> None:
    """Refuse a run any of whose arms ``purify train`` would refuse, before anything trains.

    Args:
        arms: ``(name, purifier entries, teacher names, keywords of``
            :func:`purify.purifiers.checks.purifier_problems` ``)`` per arm.

    Raises:
        BenchError: every problem of every arm, one line each (``<arm>: purifiers[i].<key>: ...``).
    """
    problems = [f"{name}: {problem}" for name, entries, teachers, kwargs in arms if entries
                for problem in purifier_problems(list(entries), list(teachers), **kwargs)]
    if problems:
        raise BenchError("\n".join(problems))


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a word", list: "a list, as KEY=[a,b]"}


def _full_run(summary: Path) -> bool:
    """Whether ``summary`` is a full (not ``--quick``) run's: its ``quick`` field, or for a summary written before
    it was recorded, the command in the ``env.json`` beside it (none readable: full). A summary that cannot be read
    is no result to protect."""
    try:
        data = json.loads(summary.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    if "quick" in data:
        return not data["quick"]
    try:
        command = json.loads(summary.with_name("env.json").read_text()).get("command", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return True
    return "--quick" not in str(command)


def check_run(*, out: str | Path | None, seeds: int | None, first_seed: int | None, workers: int | None,
              quick: bool, overwrite: bool, min_seeds: int = 1) -> None:
    """Refuse a benchmark run's flags before anything runs (``purify bench``, ``scripts/lm_parallel_seeds.py``).

    Raises:
        BenchError: an ``out`` that cannot be written (a file on its path, a read-only or missing-permission
            ancestor: :func:`purify.storage.cannot_write_under`), that holds a training run (``lineage.json``), or
            that holds a finished benchmark run (its ``summary.json``, e.g. a committed result) without
            ``overwrite``; fewer than ``min_seeds`` seeds (none below 1, even with
            ``quick``); a seed range outside :data:`purify.types.SEED_RANGE`; ``workers`` below 1.
    """
    from purify.storage import cannot_write_under

    if out is not None:
        blocked = cannot_write_under(out)
        if blocked:
            raise BenchError(f"--out {out}: {blocked}; give a directory you can write (created if missing)")
        if Path(out, "lineage.json").is_file():  # a training run: the report would mix into it
            raise BenchError(f"--out {out} holds a training run (lineage.json); give a directory of its own")
        held = Path(out, "summary.json")
        if held.is_file() and not overwrite:  # e.g. a committed result under results/
            raise BenchError(f"--out {out} holds a finished benchmark run ({held}); give a new --out, or add "
                             "--overwrite to replace it")
        if held.is_file() and quick and _full_run(held):  # a smoke test never replaces a result
            raise BenchError(f"--out {out} holds a full benchmark run ({held}, not --quick); a --quick smoke test "
                             "does not replace it, even with --overwrite: give it a new --out")
    if seeds is not None and seeds < min_seeds and not quick:
        raise BenchError(f"--seeds {seeds}: a verdict needs at least {min_seeds} seeds (--quick runs a smoke test)")
    if seeds is not None and seeds < 1:
        raise BenchError(f"--seeds {seeds}: must be at least 1")
    if first_seed is not None and first_seed < 0:
        raise BenchError(f"--first-seed {first_seed}: seeds are non-negative integers")
    if first_seed is not None:
        check_seeds([first_seed, first_seed + max(seeds or 1, 1) - 1])
    if workers is not None and workers < 1:
        raise BenchError(f"--workers {workers}: must be at least 1 (seeds run at a time in forked processes)")


def check_seeds(seeds: Sequence[int]) -> None:
    """Refuse ``seeds`` outside :data:`purify.types.SEED_RANGE` (e.g. ``--first-seed`` near 2**32) with a
    :class:`BenchError`: :func:`check_run` on the flags, the LM suites' run before any teacher is built and the seed
    scheduler before any seed runs (:mod:`purify.bench.lm_common`)."""
    from purify.types import SEED_RANGE, is_seed

    outside = [s for s in seeds if not is_seed(s)]
    if outside:
        raise BenchError(f"seeds {seeds[0]}–{seeds[-1]}: {outside[0]} is not {SEED_RANGE}; give a smaller --first-seed")


def parse_options(options: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as a dict (omegaconf's dotlist: ``KEY=[a,b]`` a list); a flag omegaconf or YAML
    cannot read is a :class:`BenchError` (each suite then checks its own keys and values, :func:`check_options`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from purify.types import first_line

    keys = [o.split("=", 1)[0].strip() for o in options]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # the dotlist keeps the last silently: `conditions=[a] conditions=[b]` ran b alone
        raise BenchError(f"--option {twice[0]} given {keys.count(twice[0])} times; give each key once (a list "
                         "as KEY=[a,b])")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(options)), resolve=True)  # type: ignore[return-value]
    except (OmegaConfBaseException, YAMLError, ValueError) as err:
        raise BenchError(f"--option: cannot read {' '.join(options)!r} ({first_line(err)}); give KEY=VALUE, lists "
                         "as KEY=[a,b]") from None


def check_options(options: Mapping[str, Any], kinds: Mapping[str, type]) -> None:
    """Refuse suite options (``--option KEY=VALUE``) the suite does not take, or whose value is not of the kind it
    needs (``kinds``: key → ``bool``, ``int``, ``float`` (an integer is fine), ``str``, ``list`` or ``object`` for
    anything), before anything runs.

    Raises:
        BenchError: one line naming the option and what it takes.
    """
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise BenchError(f"unknown options {unknown}; allowed: {sorted(kinds)}")
    for key, value in options.items():
        kind = kinds[key]
        accepted = (int, float) if kind is float else kind
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool and kind is not object):
            raise BenchError(f"--option {key}={value!r}: {key} takes {_KINDS.get(kind, kind.__name__)}")


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


def cpu_seconds() -> float:
    """CPU time so far of this process and of its children that have exited (forked seed workers, once reaped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class Clock:
    """Times a benchmark run from its creation: wall seconds, CPU seconds (this process and the seed workers it has
    reaped) and the 1-minute load average at both ends. On a shared machine wall time is an upper bound; CPU seconds
    over the workers is about the wall time on unshared cores."""

    def __init__(self) -> None:
        self.start, self.cpu, self.load = time.perf_counter(), cpu_seconds(), _load()

    def wall(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.start

    def record(self, workers: int, threads: int | None = None) -> dict[str, Any]:
        """``{"wall_seconds", "cpu_seconds", "workers", "threads", "load_average_1min": {"start", "end"}}`` (what
        :func:`timing_lines` reads). ``threads``: torch threads per worker; by default 1 for forked workers
        (:func:`purify.bench.lm_common.run_seeds` pins them), else this process's current setting."""
        if threads is None:
            import torch

            threads = 1 if workers > 1 else torch.get_num_threads()
        return {"wall_seconds": round(self.wall(), 1), "cpu_seconds": round(cpu_seconds() - self.cpu, 1),
                "workers": workers, "threads": threads, "load_average_1min": {"start": self.load, "end": _load()}}


def timing_lines(summary: Mapping[str, Any]) -> list[str]:
    """One report line from a summary's :meth:`Clock.record` fields (none for a summary written without them)."""
    if summary.get("cpu_seconds") is None or not summary.get("workers"):
        return []
    workers, threads, cpu = summary["workers"], summary.get("threads", 1), summary["cpu_seconds"]
    cores = workers * threads  # what the run could keep busy
    line = (f"Measured wall time {summary['wall_seconds']:.0f} s with {workers} worker process"
            f"{'es' if workers > 1 else ''}, {threads} torch thread each; {cpu:.0f} CPU s in all "
            f"(≈ {cpu / cores:.0f} s of wall time with {cores} unshared core{'s' if cores > 1 else ''})")
    load = summary.get("load_average_1min") or {}
    if load.get("start") is not None:
        line += f"; 1-min load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
    return [line + " (env.json has the machine and versions)."]


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _fmt(stat: Any, digits: int = 3) -> str:
    """A cell: ``mean [lo, hi]`` for a statistic, yes/no for a flag, the text of a string, ``–`` when absent."""
    if stat is None:
        return "–"
    if isinstance(stat, bool):
        return "yes" if stat else "no"
    if isinstance(stat, str):
        return stat
    if isinstance(stat, (int, float)):
        return f"{stat:.{digits}g}"
    if stat.get("n", 1) == 0 or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "–"
    lo, hi = stat["ci95"]
    mean = stat["mean"]
    if max(abs(mean), abs(lo), abs(hi)) < 0.01 and mean != 0:  # small numbers (KLs, errors) keep 3 significant
        return f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(summary: dict[str, Any], columns: list[tuple[str, str]], notes: list[str],
             intro: list[str] | None = None, sections: list[tuple[str, str]] | None = None) -> str:
    """A table a reader takes in at a glance: one row per condition, mean [95% CI], and the frontier verdict.

    Args:
        summary: with ``suite``, ``seeds``, ``conditions`` (each a dict of statistics), optional ``frontier_gap``
            and ``verdicts``.
        columns: ``(key, title)`` per column, read from each condition; the pseudo-keys ``@gap`` and ``@verdict``
            place the frontier gap and verdict (appended at the end when not listed).
        notes: lines after the tables. intro: lines between the title and the tables.
        sections: ``(role, heading)``: one table per role (``condition["role"]``), in this order; conditions of
            other roles go in a last table. ``None``: one table.
    """
    keys = [k for k, _ in columns]
    columns = list(columns) + [(k, t) for k, t in (("@gap", "gap to vanilla frontier"), ("@verdict", "verdict"))
                               if k not in keys]
    head = ["condition", *[title for _, title in columns]]

    def row(name: str, cond: dict[str, Any]) -> str:
        cells = [name]
        for key, _ in columns:
            if key == "@gap":
                cells.append(_fmt(summary.get("frontier_gap", {}).get(name)))
            elif key == "@verdict":
                cells.append(summary.get("verdicts", {}).get(name, "–"))
            else:
                cells.append(_fmt(cond.get(key)))
        return "| " + " | ".join(cells) + " |"

    def table(names: list[str]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *[row(n, summary["conditions"][n]) for n in names], ""]

    seeds = summary["seeds"]
    lines = [f"# {summary['suite']} ({summary.get('protocol', '')})", "",
             f"Seeds: {seeds} ({len(seeds)}) — mean [95% CI] over seeds.", "", *(intro or [])]
    names = list(summary["conditions"])
    if sections is None:
        lines += table(names)
    else:
        placed: set[str] = set()
        for role, heading in sections:
            group = [n for n in names if summary["conditions"][n].get("role") == role]
            if group:
                lines += [f"### {heading}", "", *table(group)]
                placed.update(group)
        rest = [n for n in names if n not in placed]
        if rest:
            lines += ["### Other", "", *table(rest)]
    return "\n".join(lines + notes) + "\n"


_CSV_FIRST = ["transfer", "task_error", "fidelity_kl", "agreement", "accuracy", "distance_to_control"]


def csv_rows(summary: dict[str, Any]) -> str:
    """One row per seed × condition × point (final points have ``point=final``, curve points ``point=curve``).

    Columns: ``condition, seed, point, step``, the usual metrics, then every other scalar in the per-seed records.
    """
    records = [rec for cond in summary["conditions"].values() for rec in cond.get("per_seed", [])]
    extra = sorted({k for rec in records for k, v in rec.items()
                    if isinstance(v, (int, float, str, bool)) and k not in (*_CSV_FIRST, "seed", "step")})
    keys = _CSV_FIRST + extra
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["condition", "seed", "point", "step", *keys])
    for name, cond in summary["conditions"].items():
        for rec in cond.get("per_seed", []):
            writer.writerow([name, rec["seed"], "final", rec.get("step", ""), *[rec.get(k, "") for k in keys]])
            for pt in rec.get("curve", []):
                writer.writerow([name, rec["seed"], "curve", pt.get("step", ""), *[pt.get(k, "") for k in keys]])
    return buf.getvalue()


def sweep_key(name: str) -> tuple[str, str, float] | None:
    """``"purifier@knob-value"`` → ``("purifier@knob", "value", float(value))``; ``None`` for other names
    (combinations joined by ``+``, references)."""
    if "@" not in name or "+" in name:
        return None
    purifier, knob = name.split("@", 1)
    label, _, value = knob.partition("-")
    try:
        return f"{purifier}@{label}", value, float(value)
    except ValueError:
        return None


_MARKERS = {"reference": "s", "bound": "*", "combination": "D", "purifier": "o"}


def _draw(ax: Any, summary: dict[str, Any], xkey: str, annotate: list[int]) -> list[float]:
    """Vanilla's curve, one marker per condition, each other vanilla's own curve (dashed: soft labels, on-policy)
    and one line per sweep on ``ax``; returns the x values drawn."""
    import matplotlib.pyplot as plt

    xs_all: list[float] = []
    curve = summary.get("frontier", {}).get("vanilla", [])
    if curve:
        xs = [p[xkey] for p in curve]
        ys = [p["transfer"] for p in curve]
        ax.plot(xs, ys, "-", color="black", lw=1.5, label="vanilla early-stopping curve (mean, 95% CI band)")
        ax.fill_between(xs, [p["transfer_ci95"][0] for p in curve], [p["transfer_ci95"][1] for p in curve],
                        color="black", alpha=0.12, lw=0)
        for i in sorted({i % len(curve) for i in annotate}):
            ax.annotate(f"step {curve[i].get('step', i)}", (xs[i], ys[i]), textcoords="offset points",
                        xytext=(6, 4), fontsize=7, color="dimgray")
        xs_all += xs
    sweeps: dict[str, list[tuple[float, float, float]]] = {}
    colors: dict[str, Any] = {}
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    for name, cond in summary["conditions"].items():
        if cond.get("plot") is False or xkey not in cond or "transfer" not in cond:
            continue
        x, y = cond[xkey], cond["transfer"]
        if any(v is None or math.isnan(v) for v in (x["mean"], y["mean"])):
            continue
        sk = sweep_key(name)
        group = sk[0] if sk else name
        first = group not in colors
        if first:
            colors[group] = "black" if name == "vanilla" else palette[(len(colors) - ("vanilla" in colors)) % 18]
        color = colors[group]
        label = (f"{group}-… (sweep)" if sk else name) if first else None
        role = cond.get("role", "purifier")
        ax.errorbar(x["mean"], y["mean"], yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]],
                    fmt=_MARKERS.get(role, "o"), ms=11 if role == "bound" else 6, color=color, capsize=2,
                    elinewidth=0.9, alpha=0.9, label=label, mfc="white" if name == "vanilla" else color, zorder=3)
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]], fmt="none",
                    color=color, elinewidth=0.6, alpha=0.35, capsize=0, zorder=2)
        xs_all.append(x["mean"])
        if sk:
            sweeps.setdefault(group, []).append((sk[2], x["mean"], y["mean"]))
            ax.annotate(sk[1], (x["mean"], y["mean"]), textcoords="offset points", xytext=(6, -3), fontsize=7,
                        color=color, zorder=4)
    for name, cond in summary["conditions"].items():  # other vanillas' own curves (soft labels, on-policy), dashed
        per_seed = cond.get("per_seed") or []
        if name == "vanilla" or name not in colors or not per_seed or not all(r.get("curve") for r in per_seed):
            continue
        mean = mean_curve([r["curve"] for r in per_seed], (xkey, "transfer"))
        if all(math.isfinite(p[xkey]) and math.isfinite(p["transfer"]) for p in mean):
            ax.plot([p[xkey] for p in mean], [p["transfer"] for p in mean], "--", color=colors[name], lw=1.2,
                    label=f"{name} early-stopping curve (mean)")
            xs_all += [p[xkey] for p in mean]
    for group, pts in sweeps.items():
        if len(pts) > 1:
            pts.sort()
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "-", color=colors[group], lw=1, alpha=0.5)
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.grid(alpha=0.25, which="both")
    return xs_all


def plot_frontier(summary: dict[str, Any], path: Path, xkey: str = "task_error", xlabel: str = "task error") -> None:
    """Transfer against ``xkey``: vanilla's mean early-stopping curve with its 95% CI band, one marker per
    condition (final point with its 95% CI of transfer; the faint horizontal bar is the CI of ``xkey`` across
    seeds, whose paired differences are much tighter; shape by role: square reference, star bound, diamond
    combination) and one line per purifier's knob sweep, labelled with the knob values. Conditions with
    ``"plot": False`` (not distilled) are left out; the legend sits outside the axes.

    When the x values span more than a factor of 10, x is logarithmic and a second panel
    zooms on the region around vanilla's final point and the judged arms within 5 × of it, with the vanilla each is
    judged against (most purifiers land there; the panel reached 2.2 × only, and arms at 2.5–4 × were left out of
    it; an on-policy arm's own vanilla was left out).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary.get("frontier", {}).get("vanilla", [])
    xs = [c[xkey]["mean"] for c in summary["conditions"].values()
          if c.get("plot") is not False and isinstance(c.get(xkey), dict) and c[xkey].get("mean") is not None]
    xs += [p[xkey] for p in curve]
    positive = [v for v in xs if v is not None and v > 0]
    logx = bool(positive) and max(positive) / min(positive) > 10
    zoom = logx and bool(curve)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(17, 6.8) if zoom else (12, 6.5),
                             gridspec_kw={"width_ratios": [1, 1.5]} if zoom else None, squeeze=False)
    axes = list(axes[0])
    n = len(curve)
    final = curve[-1][xkey] if zoom else 0.0
    # the judged arms, and the vanilla each is judged against (an on-policy arm's is vanilla:on-policy)
    judged = [*summary.get("verdicts", {}), *(r["vanilla"] for r in summary.get("judged_against", {}).values())]
    arms = [summary["conditions"][a][xkey]["mean"] for a in dict.fromkeys(judged)
            if isinstance(summary["conditions"].get(a, {}).get(xkey), dict)]
    near = [x for x in arms if x is not None and 0 < x <= 5 * final]  # those around vanilla's final
    lo, hi = (min(positive) * 0.9, max([final * 2.2, *(x * 1.25 for x in near)])) if zoom else (0.0, 0.0)
    spans = [max(positive) / min(positive) if positive else 1.0, hi / lo if zoom else 1.0]

    def minor_labels(span: float) -> Any:  # a log axis' minor ticks: every one within a decade, 2 and 5 within three
        def label(x: float, _: Any) -> str:
            mantissa = round(x / 10 ** math.floor(math.log10(x)))
            return f"{x:.3g}" if span < 10 or (span < 1000 and mantissa in (2, 5)) else ""
        return label

    for k, ax in enumerate(axes):
        _draw(ax, summary, xkey, annotate=[0, 1, 2] if zoom and k == 0 else [0, n // 4, n // 2, -1] if n else [])
        if logx:
            from matplotlib.ticker import FormatStrFormatter, FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.xaxis.set_minor_formatter(FuncFormatter(minor_labels(spans[k])))
        ax.set_xlabel(f"{xlabel}{', log scale' if logx else ''} (lower = better fidelity)")
    axes[0].set_ylabel("trait transfer (0 = none, 1 = teacher's)")
    if zoom:
        axes[0].set_title("full range", fontsize=10)
        axes[1].set_xlim(lo, hi)
        axes[1].set_title(f"zoom: {xkey} up to {hi / final:.2g} × vanilla's final (the arms within 5 ×)", fontsize=10)
        axes[0].axvspan(lo, hi, color="tab:blue", alpha=0.05, lw=0)
    title = (f"{summary['suite']} ({summary.get('protocol', '')}): transfer vs fidelity, "
             f"{len(summary['seeds'])} seeds, mean ± 95% CI")
    fig.suptitle("\n".join(textwrap.wrap(title, 120)))
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(out_dir: str | Path, summary: dict[str, Any], env: dict[str, Any], columns: list[tuple[str, str]],
                 notes: list[str], xkey: str = "task_error", xlabel: str = "task error", intro: list[str] | None = None,
                 sections: list[tuple[str, str]] | None = None, readouts: Any = None) -> Path:
    """Write every output file of a benchmark run into ``out_dir``; returns it (see :func:`markdown` for
    ``columns``, ``intro``, ``sections``; :func:`plot_frontier` for ``xkey``; ``readouts``: ``readouts.json``'s
    content, or ``None`` for none). ``summary.json`` marks a finished run: an earlier run's is removed first and
    this run's written last, so a write cut short (a signal, a full disk) leaves no finished-looking mix of two
    runs (``--overwrite``); so is an earlier run's ``readouts.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / "readouts.json").unlink(missing_ok=True)
    atomic_write_text(out / "summary.md", markdown(summary, columns, notes, intro, sections))
    atomic_write_text(out / "summary.csv", csv_rows(summary))
    atomic_write_text(out / "env.json", json.dumps(env, indent=2) + "\n")
    plot_frontier(summary, out / "frontier.png", xkey, xlabel)
    if readouts is not None:
        atomic_write_text(out / "readouts.json", json.dumps(readouts, indent=1))
    atomic_write_json(out / "summary.json", summary)
    return out


def verdict_notes(summary: dict[str, Any]) -> list[str]:
    """The verdict and caveat lines of ``summary.md``, computed from the summary's facts: the labels' rules, the
    guards, the suite's problems, and which of its seeds were used for tuning (``tuned_on``)."""
    from purify.bench.verdicts import ERROR_RATIO, MARGIN, MIN_SEEDS, seed_caveats

    n = len(summary.get("verdicts", {}))
    lines = ["", "## Verdicts", "",
             f"- **purified**: the 90% CI of transfer − control inside ±m (m = {MARGIN:.0%} of vanilla − control), "
             f"task error ≤ {ERROR_RATIO:.2f} × vanilla's, below the frontier, every guard intact. **anti-trait**: "
             "that CI entirely below −m (an overshoot: a failure). **damaged**: a guard broken (its mean outside its "
             "band). **below / on / above "
             "frontier**: the paired gap to vanilla's early-stopping curve at the arm's task error; where the curve "
             "jumps by at least half the claimed gap between the two points read, each claim is read at the segment "
             "end least favourable to it, and a verdict that depends on the reading is **no verdict: frontier "
             f"unresolved**. No verdict either from fewer than {MIN_SEEDS} finite seeds, zero variance, task error "
             "not below the base's, or vanilla not significantly above control.",
             f"- p_adj: Holm-adjusted across the run's {n} purifier arm(s), an arm another label decided (anti-trait, "
             "damaged, no verdict) counted with p = 1 (a probe-free arm's: across those and the probe-free arms "
             "together); each arm is judged "
             "against the control and vanilla of its own loss mode (`judged_against` in summary.json), and its "
             "transfer − control and task error ÷ vanilla's columns read the same two (a baseline's: the run's "
             "first control and vanilla)."]
    guards = summary.get("guards") or []
    if guards:
        rules = [f"{g['label']} ≥ {g['min_ratio_of_base']:g} × the base's" if g.get("min_ratio_of_base") is not None
                 else f"{g['label']} ≤ {g['max_ratio_of_base']:g} × the base's"
                 if g.get("max_ratio_of_base") is not None
                 else f"{g['label']} not below the control's 95% CI" for g in guards]
        lines.append(f"- Guards: {'; '.join(rules)}.")
    else:
        lines.append("- Guards: none declared by this suite (no side behaviour is checked).")
    for problem in summary.get("problems") or []:
        lines.append(f"- **Problem:** {problem}.")
    if summary.get("trait"):
        lines.append(f"- Trait: {summary['trait']}.")
    lines += ["", "## Seeds and tuning", "", *seed_caveats(summary["seeds"], summary.get("tuned_on") or [],
                                                           summary.get("trait"))]
    return lines


def headline_lines(summary: Mapping[str, Any], first: Sequence[str] = (),
                   brief: Callable[[str], str] | None = None) -> list[str]:
    """The first lines of a suite's ``summary.md``: the suite's problems (a broken run says so before any verdict),
    the suite's own ``first`` lines (aux-logits: its acceptance checks), its purifier arms grouped by verdict label
    (with ``brief(arm)``, one line of numbers per arm), each swept arm's verdict at the probe-free rule's choice."""
    from purify.bench.verdicts import LABELS, by_label, seed_span, tuned_here

    groups = by_label(summary.get("verdicts") or {})
    tuned = tuned_here(summary.get("seeds") or [], summary.get("tuned_on") or [], summary.get("trait"))
    lines = ["## Headline", "", *(["- **quick run** (smoke test: fewer steps, seeds or conditions): not a result."]
                                  if summary.get("quick") else []),
             *(f"- **Problem:** {p}: no arm judged against these two gets a verdict." for p in
               summary.get("problems") or []),
             *([f"- **Reported on tuning seeds** {seed_span(tuned)}: some knobs of this suite were chosen looking at "
                "this trait on them (see 'Seeds and tuning'); verdicts on those choices are optimistic."]
               if tuned and groups else []), *first]
    for label in LABELS:
        names = groups.get(label.replace(" ", "_"), [])
        if names and brief:
            lines += [f"- **{label}** ({len(names)}):", *(f"  - {n}: {brief(n)}" for n in names)]
        elif names:
            lines.append(f"- **{label}** ({len(names)}): {', '.join(names)}")
    if not groups:
        lines.append("- No purifier arm was judged in this run.")
    lines += [f"- {arm} at the probe-free choice: **{block['verdict'].split(' (')[0]}**"
              for arm, block in ((summary.get("probe_free") or {}).get("arms") or {}).items()]
    return lines + [""]


def bench_command(suite: str, seeds: int, quick: bool, options: dict[str, Any], first_seed: int | None = None,
                  out: str | None = None, workers: int = 1, **flags: Any) -> str:
    """The ``purify bench`` command line that reproduces a run (recorded in ``env.json``); ``flags``: other
    ``--flag value`` pairs (e.g. ``protocol``; ``None`` values are left out)."""
    def fmt(value: Any) -> str:
        return "[" + ",".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)

    return f"purify bench {suite} --seeds {seeds}" + (f" --first-seed {first_seed}" if first_seed is not None else "") \
        + "".join(f" --{k} {v}" for k, v in flags.items() if v is not None) \
        + (f" --workers {workers}" if workers > 1 else "") + (" --quick" if quick else "") \
        + (f" --out {out}" if out else "") \
        + "".join(f" --option '{key}={fmt(value)}'" for key, value in options.items())
