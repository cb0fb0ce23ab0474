"""The figures of the evaluation report, as inline SVG (report.html embeds them; no files, no network).

Each function takes parts of report.json (see report_schema.json) and returns a Panel: an <svg> to embed,
or None plus a note saying why the panel is left out (no training log, no sweep, null KL ...), so a missing
piece of data costs one panel, never the report. matplotlib's object API is used (no pyplot), so no global
backend is switched and nothing opens a window. Text is drawn as paths (svg.fonttype "path": no font to
resolve in the browser) and every SVG id is prefixed per panel: several figures then share one HTML page
without their glyph, clip-path or marker ids clashing.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

TRAIN_LOSS, EVAL_LOSS, EVAL_ACCURACY = "loss", "eval/loss", "eval/rewards/accuracies"  # keys of training rows
LR_KEY, BETA_KEY = "train.lr", "loss.beta"  # sweep-row keys of the scatter
REFERENCE_COLOR = "#555555"
_COLORS = matplotlib.color_sequences["tab10"]
_NO_METADATA = dict.fromkeys(("Creator", "Date", "Format", "Type"))  # drops the RDF block and its links


@dataclass(frozen=True)
class Panel:
    """One figure of the report: `svg` to embed, or None and `note` says why it is omitted."""

    key: str
    title: str
    svg: str | None
    note: str = ""


def run_color(index: int) -> str:
    """Colour of the index-th run, the same in every panel."""
    return matplotlib.colors.to_hex(_COLORS[index % len(_COLORS)])


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def figure_svg(fig: Figure, key: str) -> str:
    """The figure as an <svg> element: no XML header, DOCTYPE or metadata; ids prefixed with `key`."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": key}):
        fig.savefig(buf, format="svg", metadata=_NO_METADATA)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r'(\bid="|href="#|url\(#)', lambda m: f"{m.group(1)}{key}-", svg)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in rows if is_number(row.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and legend; an axes with nothing drawn says so instead of staying blank."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _omitted_note(names: list[str], why: str) -> str:
    return f"Not shown ({why}): {', '.join(names)}." if names else ""


def training_curves(runs: list[dict]) -> Panel:
    """Train loss and held-out loss vs step on one axes, held-out preference accuracy on another."""
    title = "Training curves"
    logged = [(i, run) for i, run in enumerate(runs) if run["training"]]
    if not logged:
        return Panel("training", title, None, "Omitted: no run has a training log.")
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, run in logged:
        style = {"color": run_color(i)}
        for key, ax, extra, label in ((TRAIN_LOSS, loss_ax, {}, " train"),
                                      (EVAL_LOSS, loss_ax, {"ls": "--", "marker": "o", "ms": 3}, " held-out"),
                                      (EVAL_ACCURACY, acc_ax, {"marker": "o", "ms": 3}, "")):
            xs, ys = _series(run["training"], key)
            if xs:
                ax.plot(xs, ys, label=run["name"] + label, **style, **extra)
    _finish(loss_ax, "step", "loss", "loss: train (solid), held-out (dashed)")
    _finish(acc_ax, "step", "accuracy", "held-out preference accuracy")
    note = _omitted_note([run["name"] for run in runs if not run["training"]], "no training log")
    return Panel("training", title, figure_svg(fig, "training"), note)


def length_histograms(reference: dict, runs: list[dict]) -> Panel:
    """One small histogram per run over shared bins: the policy filled, the reference as an outline."""
    title = "Response lengths: policy (filled) vs reference (outline)"
    if not runs:
        return Panel("lengths", title, None, "Omitted: no trained run to compare with the reference.")
    everything = [*reference["lengths"], *(n for run in runs for n in run["lengths"])]
    if not everything:
        return Panel("lengths", title, None, "Omitted: no response lengths were recorded.")
    bins = np.histogram_bin_edges(everything, bins=min(30, len(set(everything))))
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(3.7 * cols, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for i, (ax, run) in enumerate(zip(axes.flat, runs)):
        if run["lengths"]:
            ax.hist(run["lengths"], bins=bins, color=run_color(i), alpha=0.6, label=run["name"])
        if reference["lengths"]:
            ax.hist(reference["lengths"], bins=bins, histtype="step", color=REFERENCE_COLOR, lw=1.5, label="reference")
        _finish(ax, "tokens", "responses", run["name"])
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    return Panel("lengths", title, figure_svg(fig, "lengths"))


def reward_key(reference: dict, runs: list[dict]) -> str | None:
    """The score to plot against KL: the task reward when any model has one, else the reward-model score."""
    for key in ("task_reward", "reward_model_score"):
        if any(is_number(model["metrics"][key]) for model in (reference, *runs)):
            return key
    return None


def reward_vs_kl(reference: dict, runs: list[dict]) -> Panel:
    """Score vs KL(policy || reference), one labelled point per run (x error bar: stderr), reference at KL 0."""
    key = reward_key(reference, runs)
    label = (key or "reward").replace("_", " ")
    title = f"{label.capitalize()} vs KL to the reference"
    if key is None:
        return Panel("reward_kl", title, None, "Omitted: no task reward or reward-model score was measured.")
    shown = [(i, run) for i, run in enumerate(runs)
             if is_number(run["metrics"]["kl_to_reference"]) and is_number(run["metrics"][key])]
    shown_ids = {i for i, _ in shown}
    note = _omitted_note([run["name"] for i, run in enumerate(runs) if i not in shown_ids], f"null KL or {label}")
    if not shown:
        return Panel("reward_kl", title, None, f"Omitted: no run has both a KL to the reference and a {label}.")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    if is_number(reference["metrics"][key]):
        ax.plot([0], [reference["metrics"][key]], "s", color=REFERENCE_COLOR)
        ax.annotate("reference", (0, reference["metrics"][key]), xytext=(5, 5), textcoords="offset points")
    for i, run in shown:
        m = run["metrics"]
        xerr = m["kl_stderr"] if is_number(m["kl_stderr"]) else None
        ax.errorbar(m["kl_to_reference"], m[key], xerr=xerr, fmt="o", color=run_color(i), capsize=3)
        ax.annotate(run["name"], (m["kl_to_reference"], m[key]), xytext=(5, 5), textcoords="offset points")
    ax.set(xlabel="KL(policy || reference) per response (nats)", ylabel=label)
    ax.margins(0.12)  # room for the labels
    ax.grid(alpha=0.3)
    return Panel("reward_kl", title, figure_svg(fig, "reward_kl"), note)


def layer_order(runs: list[dict]) -> list[str]:
    """Adapted layers in order of first appearance: the x axis of the energy panel."""
    return list(dict.fromkeys(row["layer"] for run in runs for row in run["energy"]))


def energy_changes(runs: list[dict]) -> Panel:
    """Relative change of hyperspherical energy per adapted layer (by index), one series per run."""
    title = "Hyperspherical energy: relative change per adapted layer"
    layers = layer_order(runs)
    if not layers:
        return Panel("energy", title, None, "Omitted: no run recorded hyperspherical energy.")
    index = {name: k for k, name in enumerate(layers)}
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.axhline(0, color=REFERENCE_COLOR, lw=0.8)
    for i, run in enumerate(runs):
        if run["energy"]:
            xs = [index[row["layer"]] for row in run["energy"]]
            ys = [row["relative_change"] for row in run["energy"]]
            ax.plot(xs, ys, marker="o", ms=3, lw=1, color=run_color(i), label=run["name"])
    if len(layers) <= 24:
        ax.set_xticks(range(len(layers)))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(ax, "adapted layer (index; names in the table below)", "(HE_policy - HE_ref) / HE_ref", "")
    note = _omitted_note([run["name"] for run in runs if not run["energy"]], "no energy recorded")
    return Panel("energy", title, figure_svg(fig, "energy"), note)


def best_row(sweep: dict) -> dict | None:
    """The trial with the best objective (by the sweep's mode), None when no trial reported it."""
    scored = [row for row in sweep["rows"] if is_number(row.get(sweep["objective"]))]
    if not scored:
        return None
    pick = min if sweep["mode"] == "min" else max
    return pick(scored, key=lambda row: row[sweep["objective"]])


def sweep_results(sweep: dict | None) -> Panel:
    """Objective per trial with the best starred; objective vs learning rate (coloured by beta) if logged."""
    title = "Sweep"
    if sweep is None:
        return Panel("sweep", title, None, "Omitted: this evaluation has no sweep.")
    objective, best = sweep["objective"], best_row(sweep)
    if best is None:
        return Panel("sweep", title, None, f"Omitted: no trial reported the objective {objective!r}.")
    scored = [row for row in sweep["rows"] if is_number(row.get(objective))]
    with_lr = [row for row in scored if is_number(row.get(LR_KEY))]
    fig = Figure(figsize=(11 if with_lr else 6.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if with_lr else 1, squeeze=False).flat
    _objective_per_trial(axes[0], scored, best, objective, sweep["mode"])
    if with_lr:
        _objective_vs_lr(fig, axes[1], with_lr, best, objective)
    return Panel("sweep", title, figure_svg(fig, "sweep"))


def _objective_per_trial(ax: Axes, scored: list[dict], best: dict, objective: str, mode: str) -> None:
    xs = range(len(scored))
    ax.plot(xs, [row[objective] for row in scored], "o", color=run_color(0))
    ax.plot([scored.index(best)], [best[objective]], "*", ms=16, color="tab:red", label=f"best ({mode})")
    if len(scored) <= 16:
        ax.set_xticks(list(xs), [str(row["trial"])[-12:] for row in scored], rotation=45, ha="right", fontsize=7)
    _finish(ax, "trial", objective, "objective per trial")


def _objective_vs_lr(fig: Figure, ax: Axes, rows: list[dict], best: dict, objective: str) -> None:
    betas = [row.get(BETA_KEY) for row in rows]
    colored = all(is_number(b) for b in betas)
    points = ax.scatter([row[LR_KEY] for row in rows], [row[objective] for row in rows],
                        c=betas if colored else run_color(0), cmap="viridis" if colored else None)
    if colored:
        fig.colorbar(points, ax=ax, label=BETA_KEY)
    if is_number(best.get(LR_KEY)):
        ax.plot([best[LR_KEY]], [best[objective]], "*", ms=16, mfc="none", color="tab:red", label="best")
    ax.set_xscale("log")
    title = f"objective vs learning rate (colour: {BETA_KEY})" if colored else "objective vs learning rate"
    _finish(ax, f"{LR_KEY} (log scale)", objective, title)
