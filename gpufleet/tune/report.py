"""What a tuning run shows: a table of every trial, the decision, and a picture.

``trial_table`` (rich) lists every trial in order; ``write_reports`` writes ``tune.json`` (every
trial and the summary), ``tune.png`` (throughput against p99 at the highest concurrency level
for every measured trial, the p99 objective as a line, the Pareto front and the chosen config
marked; matplotlib's Agg backend, no display needed) and ``tune.html``, which shows the picture,
the table, the decision and the spec's diff in one self-contained file.

    write_reports(result, Path("build/local/tune/tabular_mlp"), diff=edit.diff)
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from gpufleet.tune.objective import Assessment
from gpufleet.tune.search import TuneResult
from gpufleet.tune.trial import Trial


def trial_table(result: TuneResult) -> Table:
    levels = result.objective.levels
    table = Table(title=f"{result.spec.name}: {len(result.trials)} trials ({result.mode} search)")
    for header in ("#", "config", *(f"c={level}" for level in levels), "s", "verdict"):
        table.add_column(header, overflow="fold")
    chosen = result.choice.chosen
    for trial in result.trials:
        cells = _level_cells(trial, len(levels))
        verdict = _verdict(trial, result)
        if chosen and trial.candidate == chosen.candidate and trial.baseline == chosen.baseline:
            verdict += " *chosen*" if trial.repeat == 0 else ""
        table.add_row(str(trial.number), _label(trial), *cells, f"{trial.duration_s:.1f}", verdict)
    return table


def _label(trial: Trial) -> str:
    name = "the spec as written" if trial.baseline else trial.candidate.label
    return name + (f" (again #{trial.repeat + 1})" if trial.repeat else "")


def _level_cells(trial: Trial, count: int) -> list[str]:
    if not trial.loaded:
        return ["-"] * count
    return [
        f"{level.throughput_per_s:.0f}/s p99 {level.p99_ms:.2f} ms"
        + (f" {level.errors} err" if level.errors else "")
        for level in trial.levels
    ]


def _verdict(trial: Trial, result: TuneResult) -> str:
    if not trial.loaded:
        return f"load failed: {trial.load_error}"
    objective = result.objective
    misses = [level for level in trial.levels if level.p99_ms > objective.p99_ms or level.errors]
    if misses:
        return "misses p99 at c=" + ",".join(str(level.concurrency) for level in misses)
    highest = trial.levels[-1].throughput_per_s
    if objective.min_throughput_per_s and highest < objective.min_throughput_per_s:
        return "below min throughput"
    return "meets"


def decision_lines(result: TuneResult) -> list[str]:
    """The decision in words: objective, what decided, the noise, the chosen or closest."""
    summary = result.summary()
    lines = [
        f"objective: {result.objective.text}",
        f"{summary['trials']} trials of {summary['configs_tried']} configs "
        f"({result.mode}; grid {summary['grid_size']}, {summary['refused_by_spec_checks']} "
        f"refused by the spec's checks, {summary['failed_loads']} failed to load), "
        f"{result.wall_s:.0f} s",
        f"noise: {result.noise.text}",
        f"decided by: {result.choice.decided_by}",
    ]
    baseline = result.baseline
    if result.choice.chosen is not None:
        lines.append(f"chosen: {_describe(result.choice.chosen)}")
    elif result.choice.closest is not None:
        lines.append(f"closest (does not meet the objective): {_describe(result.choice.closest)}")
    if baseline is not None:
        lines.append(f"the spec as written: {_describe(baseline)}")
    return lines


def _describe(assessment: Assessment) -> str:
    p99 = ", ".join(f"{value:.2f}" for value in assessment.p99_ms) or "-"
    return (
        f"{assessment.label}: {assessment.throughput_per_s:.0f}/s at the highest level, "
        f"p99 {p99} ms ({len(assessment.trials)} measurements)"
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(p99, throughput) points no other point beats on both (lower p99, higher throughput)."""
    front: list[tuple[float, float]] = []
    for p99, throughput in sorted(points, key=lambda point: (point[0], -point[1])):
        if not front or throughput > front[-1][1]:
            front.append((p99, throughput))
    return front


def write_reports(result: TuneResult, directory: Path, *, diff: str = "") -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "tune.json",
        "png": directory / "tune.png",
        "html": directory / "tune.html",
    }
    document: dict[str, Any] = {
        "summary": result.summary(),
        "decision": decision_lines(result),
        "space": {
            "axes": {axis: list(values) for axis, values in result.space.axes.items()},
            "kinds": list(result.space.kinds),
            "refused": [
                {"candidate": item.candidate.as_dict(), "reason": item.reason}
                for item in result.space.refused
            ],
        },
        "trials": [trial.as_dict() for trial in result.trials],
        "spec_diff": diff,
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    draw_picture(result, paths["png"])
    paths["html"].write_text(_html(result, paths["png"], diff))
    return paths


def draw_picture(result: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=100)
    measured = [trial for trial in result.trials if trial.loaded and trial.levels]
    points = [(t.levels[-1].p99_ms, t.levels[-1].throughput_per_s) for t in measured]
    meets = [_verdict(trial, result) == "meets" for trial in measured]
    for flag, colour, name in ((True, "tab:blue", "meets"), (False, "tab:gray", "misses")):
        chosen_points = [point for point, ok in zip(points, meets, strict=True) if ok == flag]
        if chosen_points:
            xs, ys = _columns(chosen_points)
            axes.scatter(xs, ys, s=18, c=colour, label=f"trial ({name})")
    baseline = [p for p, t in zip(points, measured, strict=True) if t.baseline]
    if baseline:
        xs, ys = _columns(baseline)
        axes.scatter(
            xs,
            ys,
            s=60,
            marker="s",
            facecolors="none",
            edgecolors="tab:orange",
            label="the spec as written",
        )
    front = pareto_front(points)
    if front:
        xs, ys = _columns(front)
        axes.plot(xs, ys, "--", c="tab:green", marker="o", mfc="none", ms=9, label="Pareto front")
    axes.axvline(result.objective.p99_ms, c="tab:red", lw=1, label="p99 objective")
    chosen = result.choice.chosen or result.choice.closest
    if chosen is not None and chosen.p99_ms:
        axes.scatter(
            [chosen.p99_highest_ms],
            [chosen.throughput_per_s],
            s=220,
            marker="*",
            c="gold",
            edgecolors="black",
            zorder=5,
            label="chosen" if result.choice.chosen else "closest (misses)",
        )
    level = result.objective.levels[-1]
    axes.set_xlabel(f"p99 latency at c={level} (ms)")
    axes.set_ylabel(f"throughput at c={level} (infer/s)")
    axes.set_title(f"{result.spec.name}: {len(result.trials)} trials, {result.mode} search")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _columns(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [point[0] for point in points], [point[1] for point in points]


def _html(result: TuneResult, picture: Path, diff: str) -> str:
    image = base64.b64encode(picture.read_bytes()).decode()
    rows = []
    for trial in result.trials:
        cells = _level_cells(trial, len(result.objective.levels))
        row = [str(trial.number), _label(trial), *cells, f"{trial.duration_s:.1f}"]
        row.append(_verdict(trial, result))
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    headers = ["#", "config", *(f"c={level}" for level in result.objective.levels), "s", "verdict"]
    head = "".join(f"<th>{html.escape(name)}</th>" for name in headers)
    decision = "".join(f"<li>{html.escape(line)}</li>" for line in decision_lines(result))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gpufleet tune {html.escape(result.spec.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}pre{{background:#f6f6f6;padding:1em}}
</style></head><body>
<h1>gpufleet tune {html.escape(result.spec.name)}</h1>
<ul>{decision}</ul>
<img alt="throughput against p99 for every trial" src="data:image/png;base64,{image}">
<h2>Spec diff</h2><pre>{html.escape(diff or "(no change)")}</pre>
<h2>Trials</h2><table><tr>{head}</tr>{"".join(rows)}</table>
</body></html>
"""
