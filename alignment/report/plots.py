"""The report's plots, each written to a PNG; a plot function returns None, or why it was skipped."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display (Agg canvas)

from alignment.report.query import CAPABILITY


def pareto_front(losses: list[float], misaligned: list[float]) -> list[int]:
    """Indices of the runs no other run beats on both capability (lower loss) and alignment, by loss."""
    order = sorted(range(len(losses)), key=lambda i: (losses[i], misaligned[i]))
    front, best = [], float("inf")
    for i in order:
        if misaligned[i] < best:
            front.append(i)
            best = misaligned[i]
    return front



def plot_bars(frame: pd.DataFrame, attributes: list[str], path: Path) -> str | None:
    measured = frame[frame["misaligned_pct/none/joint"].notna() | frame["misaligned_pct/aligned/joint"].notna()]
    if measured.empty:
        return "no run has evaluation metrics"
    fig = Figure(figsize=(max(6.0, 1.1 * len(measured)), 1 + 3 * len(attributes + ["joint"])), layout="constrained")
    axes = fig.subplots(len(attributes) + 1, 1, sharex=True, squeeze=False)[:, 0]
    x, conditioned = range(len(measured)), measured.aligned_combination != "none"
    for ax, attr in zip(axes, attributes + ["joint"]):
        for offset, side, label in ((-0.2, "none", "unconditioned"), (0.2, "aligned", "aligned control tokens")):
            value = measured[f"misaligned_pct/{side}/{attr}"]
            if side == "aligned":
                value = value.where(conditioned)
            errors = [(value - measured[f"misaligned_pct/{side}/{attr}_low"]).clip(lower=0).fillna(0),
                      (measured[f"misaligned_pct/{side}/{attr}_high"] - value).clip(lower=0).fillna(0)]
            ax.bar([i + offset for i in x], value, 0.4, yerr=errors, capsize=3, label=label)
        ax.set(title=f"{attr}", ylabel="misaligned sentences (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[-1].set_xticks(list(x), measured.label, rotation=30, ha="right")
    fig.suptitle("Unconditioned vs aligned control tokens (95% intervals)")
    fig.savefig(path, dpi=110)


def plot_lines(lines: pd.DataFrame, x: str, path: Path, title: str, xlabel: str, xmin: float | None = None) -> None:
    """One line per run of jointly misaligned % against `x` (tokens seen, guidance scale)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, line in lines.sort_values(x).groupby("label", sort=False):
        drawn = ax.plot(line[x], line.misaligned_pct, marker="o", label=label)
        if {"low", "high"} <= set(line.columns) and line[["low", "high"]].notna().all().all():
            ax.fill_between(line[x], line.low, line.high, color=drawn[0].get_color(), alpha=0.15, lw=0)
    ax.set(title=title + " (bands: 95% intervals)", xlabel=xlabel, ylabel="jointly misaligned sentences (%)",
           ylim=(0, None), xlim=(xmin, None))
    ax.grid(alpha=0.3)
    ax.legend(title="run [conditioning]", fontsize="small")
    fig.savefig(path, dpi=110)


def plot_curves(curves: pd.DataFrame, path: Path) -> str | None:
    if curves.empty:
        return "no run logged curve/<combination>/joint/misaligned with curve/tokens_seen"
    plot_lines(curves, "tokens_seen", path, "Alignment during training", "tokens seen", xmin=0)


def plot_guidance(guidance: pd.DataFrame, path: Path) -> str | None:
    if guidance.empty:
        return "no run was evaluated with a guidance scale other than 1"
    plot_lines(guidance[guidance.attribute == "joint"], "guidance", path,
               "Misalignment vs classifier-free guidance scale", "guidance scale g")


def plot_pareto(frame: pd.DataFrame, attributes: list[str], path: Path) -> str | None:
    y = "misaligned_pct/aligned/joint"
    points = frame.dropna(subset=[CAPABILITY, y])
    if points.empty:
        return f"no run has both {CAPABILITY} and evaluation metrics"
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for objective, group in points.groupby("objective", sort=False):
        ax.scatter(group[CAPABILITY], group[y], s=40, label=objective)
    for _, p in points.iterrows():
        ax.annotate(p.label, (p[CAPABILITY], p[y]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    # only runs scored on the same attributes are comparable: one front per such group
    scored = points[[f"misaligned_pct/aligned/{a}" for a in attributes]].notna().apply(tuple, axis=1)
    for i, (_, group) in enumerate(points.groupby(scored)):
        front = group.iloc[pareto_front(list(group[CAPABILITY]), list(group[y]))]
        ax.plot(front[CAPABILITY], front[y], "k--", lw=1, label="Pareto front" if i == 0 else None)
    ax.set(title="Capability vs alignment (lower-left is better)", xlabel=f"{CAPABILITY} (LM loss on untagged text)",
           ylabel="jointly misaligned sentences (%)", ylim=(0, None))
    ax.margins(x=0.2)
    ax.grid(alpha=0.3)
    ax.legend(title="objective", fontsize="small")
    fig.savefig(path, dpi=110)

