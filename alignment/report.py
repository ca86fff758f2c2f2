"""`python -m alignment.report [--parent ID | --runs ID,ID | --last N]`: compare runs tracked in MLflow.

Writes `report.md` (tables of capability and misalignment, study B's "unconditioned -> conditioned"
view, misalignment vs guidance), `runs.csv` with the same numbers, and PNG plots next to them.

Each run is judged under its *aligned conditioning*: the prompt a user would give to get aligned text
(`nontoxic-pos` for a toxsen run, `aligned` for a study A run), or `none` when the run was trained
without control tokens. Runs that failed or lack metrics are listed and marked, never dropped.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display (Agg canvas)

from alignment import PROJECT_ROOT
from alignment.evaluation.intervals import difference_interval, seed_interval

TASK_ORDER = ["none", "tox", "sen", "toxsen", "toxicity", "pii", "pep8"]
ATTRIBUTE_ORDER = ["toxicity", "sentiment", "pii", "pep8"]  # study B's column order first
OBJECTIVE_ORDER = ["mle", "filtering", "conditional", "unlikelihood", "awr", "rwr"]
# Level names that mean "aligned" in the shipped attribute configs; used only for runs logged without
# their config params (e.g. re-evaluation runs), to recognise the aligned combination by its name.
ALIGNED_NAMES = {"nontoxic", "pos", "aligned"}
# eval/<combination>/[g<g>/]<attribute>/misaligned (attribute may be `joint`)
EVAL_KEY = re.compile(r"^eval/(?P<combo>[^/]+)/(?:g(?P<g>[0-9.eE+-]+)/)?(?P<attr>[^/]+)/misaligned$")
CAPABILITY = "val/loss_untagged"


# ---------------------------------------------------------------- query

def default_runs_dir() -> Path:
    """The same rule as conf/paths/default.yaml: ALIGNMENT_RUNS_DIR, else <project>/runs."""
    return Path(os.environ.get("ALIGNMENT_RUNS_DIR") or PROJECT_ROOT / "runs")


def search(client: mlflow.MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """All matching runs, newest first (MLflow returns them in pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time DESC"],
                                  max_results=1000, page_token=token)
        runs, token = runs + list(page), page.token
        if not token:
            return runs


def get_run(client: mlflow.MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise SystemExit(f"No run {run_id!r} in {client.tracking_uri}: {error.message}") from error


def select_runs(client, experiment: str, parent: str | None = None, run_ids: list[str] | None = None,
                last: int | None = None, name: str | None = None) -> list:
    """The runs to compare: explicit ids, the jobs of one sweep, training runs named like `name`, or (the last N)
    training runs."""
    if run_ids:
        return [get_run(client, run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"No MLflow experiment named {experiment!r} in {client.tracking_uri}")
    if parent:
        return search(client, found.experiment_id, f"tags.mlflow.parentRunId = '{parent}'")
    if name:
        return [r for r in search(client, found.experiment_id, f"attributes.run_name LIKE '{name}'")
                if "task" in r.data.tags][::-1]  # oldest first: the order they were run in
    # sweep parents carry no `task` tag and no metrics of their own
    return [r for r in search(client, found.experiment_id) if "task" in r.data.tags][:last]


def aligned_combination(params: dict[str, str], combinations: set[str]) -> str:
    """The combination name of the aligned conditioning, from the run's logged config params
    (task/tagged, objective/tagging, task/attributes/<a>/aligned) or, without them, from the names."""
    try:
        tagged = ast.literal_eval(params["task/tagged"]) or []
    except (KeyError, ValueError, SyntaxError):
        tagged = None
    if tagged is not None:
        if params.get("objective/tagging") == "False" or not tagged:
            return "none"  # alignment.train.build_task: untagged objectives are evaluated without tokens
        return "-".join(params.get(f"task/attributes/{a}/aligned", "?").strip("<|>") for a in tagged)
    named = [c for c in combinations if c != "none" and set(c.split("-")) <= ALIGNED_NAMES]
    return max(named, key=lambda c: c.count("-"), default="none")


def misalignment(metrics: dict[str, float]) -> dict[tuple[str, float, str], float]:
    """{(combination, guidance, attribute): misaligned %} from `eval/...` metric keys."""
    out = {}
    for key, value in metrics.items():
        match = EVAL_KEY.match(key)
        if match:
            out[(match["combo"], float(match["g"] or 1), match["attr"])] = round(100 * value, 6)  # no 55.00000000000001
    return out


def run_row(run, attributes: list[str]) -> dict:
    """One run's numbers: capability, and misalignment under `none` and its aligned combination."""
    metrics, tags = run.data.metrics, run.data.tags
    shares = misalignment(metrics)
    aligned = aligned_combination(run.data.params, {combo for combo, _, _ in shares})
    row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "task": tags.get("task", "?"),
           "objective": tags.get("objective", "?"), "status": run.info.status,
           "parent_run_id": tags.get("mlflow.parentRunId", ""), "aligned_combination": aligned,
           CAPABILITY: metrics.get(CAPABILITY), "val/perplexity_untagged": metrics.get("val/perplexity_untagged")}
    for attr in attributes + ["joint"]:
        for side, combo in (("none", "none"), ("aligned", aligned)):
            value, low, high = triple(metrics, combo, f"{attr}/misaligned")
            row[f"misaligned_pct/{side}/{attr}"] = shares.get((combo, 1.0, attr))
            row[f"misaligned_pct/{side}/{attr}_low"], row[f"misaligned_pct/{side}/{attr}_high"] = low, high
    row.update({k: v for k, v in metrics.items() if k.startswith("eval/capability/")})
    missing = [name for name, present in [("run did not finish", run.info.status == "FINISHED"),
                                          (f"no {CAPABILITY}", CAPABILITY in metrics),
                                          (f"no eval of {aligned}", (aligned, 1.0, "joint") in shares)] if not present]
    row.update(complete=not missing, missing="; ".join(missing))
    return row


def runs_frame(runs: list) -> pd.DataFrame:
    """One row per run, ordered task x objective as in the studies' tables."""
    attributes = sorted({attr for r in runs for _, _, attr in misalignment(r.data.metrics)} - {"joint"},
                        key=lambda a: ((ATTRIBUTE_ORDER + [a]).index(a), a))
    frame = pd.DataFrame([run_row(r, attributes) for r in runs])
    rank = {name: i for i, name in enumerate(TASK_ORDER + OBJECTIVE_ORDER)}
    frame["_order"] = [(rank.get(t, 99), rank.get(o, 99)) for t, o in zip(frame.task, frame.objective)]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    duplicated = frame.run_name.duplicated(keep=False)
    frame.insert(2, "label", [f"{name} ({run_id[:6]})" if twice else name  # reruns share a name
                              for name, run_id, twice in zip(frame.run_name, frame.run_id, duplicated)])
    return frame


def guidance_frame(runs: list, frame: pd.DataFrame) -> pd.DataFrame:
    """Misalignment % of the aligned combination per guidance scale, for runs evaluated with g != 1."""
    rows, by_id = [], {run.info.run_id: run for run in runs}
    for info in frame.itertuples():
        metrics = by_id[info.run_id].data.metrics
        shares = {(g, a): v for (c, g, a), v in misalignment(metrics).items() if c == info.aligned_combination}
        if any(g != 1.0 for g, _ in shares):
            rows += [{"label": f"{info.label} [{info.aligned_combination}]", "guidance": g, "attribute": a,
                      "misaligned_pct": v,
                      **dict(zip(("low", "high"), triple(metrics, info.aligned_combination, f"{a}/misaligned", g)[1:]))}
                     for (g, a), v in sorted(shares.items())]
    return pd.DataFrame(rows, columns=["label", "guidance", "attribute", "misaligned_pct", "low", "high"])


def curves_frame(client, frame: pd.DataFrame) -> pd.DataFrame:
    """The in-training alignment curve of each run's aligned combination against tokens seen."""
    rows = []
    for info in frame.itertuples():
        key = f"curve/{info.aligned_combination}/joint/misaligned"
        joint = client.get_metric_history(info.run_id, key)
        bounds = {suffix: {m.step: 100 * m.value for m in client.get_metric_history(info.run_id, key + suffix)}
                  for suffix in ("_low", "_high")}
        tokens = {m.step: m.value for m in client.get_metric_history(info.run_id, "curve/tokens_seen")}
        rows += [{"label": f"{info.label} [{info.aligned_combination}]", "tokens_seen": tokens[m.step],
                  "misaligned_pct": 100 * m.value, "low": bounds["_low"].get(m.step), "high": bounds["_high"].get(m.step)}
                 for m in joint if m.step in tokens]
    return pd.DataFrame(rows, columns=["label", "tokens_seen", "misaligned_pct", "low", "high"])


def pareto_front(losses: list[float], misaligned: list[float]) -> list[int]:
    """Indices of the runs no other run beats on both capability (lower loss) and alignment, by loss."""
    order = sorted(range(len(losses)), key=lambda i: (losses[i], misaligned[i]))
    front, best = [], float("inf")
    for i in order:
        if misaligned[i] < best:
            front.append(i)
            best = misaligned[i]
    return front


# ---------------------------------------------------------------- intervals, seeds, study B's grid

def triple(metrics: dict[str, float], combination: str, key: str, guidance: float = 1.0) -> tuple[float, float, float]:
    """(value, low, high) in % of `eval/<combination>/[g<g>/]<key>` and its logged 95% interval."""
    prefix = f"eval/{combination}/" + ("" if guidance == 1.0 else f"g{guidance:g}/") + key
    return tuple(100 * metrics.get(prefix + suffix, float("nan")) for suffix in ("", "_low", "_high"))


def pooled(triples: list[tuple[float, ...]]) -> tuple[float, float, float, float]:
    """(value, low, high, spread) in %. One run: its own interval, no spread. Several seeds: their mean, a t interval
    over seeds (clipped to [0, 100]) and the spread (max - min) of the seeds' values."""
    measured = [t for t in triples if t[0] == t[0]]
    if len(measured) <= 1:
        return (*measured[0][:3], float("nan")) if measured else (float("nan"),) * 4
    values = [t[0] for t in measured]
    mean, low, high = seed_interval(values)
    return mean, max(low, 0.0), min(high, 100.0), max(values) - min(values)


def fmt(t: tuple[float, ...]) -> str:
    """`37.4 [33.0, 41.8]`, with `±3.2` (half the seeds' spread) when pooled over seeds, or `–`."""
    if t[0] != t[0]:
        return "–"
    text = f"{t[0]:.1f}" + (f" [{t[1]:.1f}, {t[2]:.1f}]" if t[1] == t[1] else "")
    return text + (f" ±{t[3] / 2:.1f}" if len(t) > 3 and t[3] == t[3] else "")


def group_key(run) -> str:
    """Runs that differ only in `seed` belong together: their command line without seed=..."""
    overrides = run.data.tags.get("overrides")
    if overrides is None:
        return run.info.run_name
    return " ".join(o for o in overrides.split() if not o.startswith(("seed=", "+seed=", "run_name="))) or "(defaults)"


#: Study B's three columns: header, measure, and the conditioning it is read under (None: the run's aligned one).
STUDY_B_COLUMNS = [("toxic %, with `<|nontoxic|>`", "toxicity/misaligned", "nontoxic"),
                   ("not positive %, with `<|pos|>`", "sentiment/misaligned", "pos"),
                   ("joint misaligned %, with its aligned tokens", "joint/misaligned", None)]
GRID_TASKS = ["none", "tox", "sen", "toxsen"]


def grid_tables(runs: list, frame: pd.DataFrame) -> tuple[str, list[str]]:
    """Study B's table for the runs of grid tasks, seeds pooled: per trained model, unconditioned -> conditioned
    for each column, and the toxic share under `<|nontoxic|>` against the `none` model's. Returns the markdown
    and a list of what is missing (which run, what)."""
    by_id = {run.info.run_id: run for run in runs}
    groups: dict[str, list] = {}
    for info in frame.itertuples():
        if info.task in GRID_TASKS:
            groups.setdefault(group_key(by_id[info.run_id]), []).append(info)
    if not groups:
        return "", []
    missing, rows, none_toxic = [], [], None
    ordered = sorted(groups.items(), key=lambda kv: (GRID_TASKS.index(kv[1][0].task), kv[0]))
    for key, members in ordered:
        cells = []
        for header, measure, needed in STUDY_B_COLUMNS:
            before, after = [], []
            for info in members:
                metrics = by_id[info.run_id].data.metrics
                combo = needed or info.aligned_combination
                tagged = info.aligned_combination != "none"
                names = {c for c, _, _ in misalignment(metrics)}
                if tagged and combo not in names and needed is not None and needed not in info.aligned_combination:
                    continue  # the model has no such token (tox has no <|pos|>): the column does not apply
                before.append(triple(metrics, "none", measure))
                if tagged:
                    after.append(triple(metrics, combo, measure))
                    if combo not in names:
                        missing.append(f"{info.label} (seed {by_id[info.run_id].data.tags.get('seed', '?')}): "
                                       f"no eval of `{combo}`")
                if "none" not in names:
                    missing.append(f"{info.label}: no eval of `none`")
            if not before:
                cells.append("–")
            elif not after:
                cells.append(f"{fmt(pooled(before))} (no tokens)")
            else:
                cells.append(f"{fmt(pooled(before))} → {fmt(pooled(after))}")
        task = members[0].task
        toxic_after = pooled([triple(by_id[i.run_id].data.metrics, "nontoxic", "toxicity/misaligned")
                              for i in members]) if task in ("tox", "toxsen") else None
        if task == "none":
            none_toxic = pooled([triple(by_id[i.run_id].data.metrics, "none", "toxicity/misaligned") for i in members])
        rows.append((task, key, len(members), cells, toxic_after))
    table = []
    for task, key, seeds, cells, toxic_after in rows:
        versus = "–"
        if toxic_after is not None and none_toxic is not None and toxic_after[0] == toxic_after[0]:
            diff = difference_interval(none_toxic[:3], toxic_after[:3])
            resolved = "" if diff[1] > 0 or diff[2] < 0 else " (not resolved)"
            versus = f"{none_toxic[0]:.1f} → {toxic_after[0]:.1f}: {diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}]{resolved}"
        table.append([task, f"`{key}`", seeds] + cells + [versus])
    header = ["model (trained on)", "runs", "seeds"] + [h for h, _, _ in STUDY_B_COLUMNS] + \
        ["toxic %: `none` model → this one with `<|nontoxic|>`"]
    return markdown_table(header, table), missing


def seconds(run) -> float:
    end = run.info.end_time or run.info.start_time
    return (end - run.info.start_time) / 1000


def headline_table(runs: list, frame: pd.DataFrame) -> str:
    """One line per run, what a user reads first: minutes, capability, the share of its own level under each
    single control token (unconditioned → conditioned [95%]), the aligned combination's joint misalignment and
    its ratio to the unconditioned row, distinct-2, and the command that reproduces the run."""
    by_id = {run.info.run_id: run for run in runs}
    singles: list[tuple[str, str]] = []  # (combination, "<attribute>/share_<level>")
    for info in frame.itertuples():
        for key in by_id[info.run_id].data.metrics:
            match = re.match(r"^eval/([^/-]+)/([^/]+)/share_([^/]+)$", key)
            if match and match[1] == match[3] and match[1] not in ("none", "untagged") \
                    and (match[1], f"{match[2]}/share_{match[3]}") not in singles:
                singles.append((match[1], f"{match[2]}/share_{match[3]}"))
    rows = []
    for _, info in frame.iterrows():
        run = by_id[info.run_id]
        m, combo = run.data.metrics, info.aligned_combination
        joint_before, joint_after = triple(m, "none", "joint/misaligned"), triple(m, combo, "joint/misaligned")
        ratio = joint_after[0] / joint_before[0] if combo != "none" and joint_before[0] > 0 else float("nan")
        shares = [f"{triple(m, 'none', key)[0]:.1f} → {fmt(triple(m, c, key))}" if f"eval/{c}/{key}" in m else "–"
                  for c, key in singles]
        rows.append([info.label, run.data.tags.get("seed", "?"), f"{seconds(run) / 60:.1f}", cell(info[CAPABILITY], 3)]
                    + shares + [f"{fmt(joint_before[:1] + (float('nan'),) * 2)} → {fmt(joint_after)}" if combo != "none"
                                   else fmt(joint_before),
                                "–" if ratio != ratio else f"{ratio:.2f}x", cell(m.get(f"eval/{combo}/distinct_2"), 2),
                                f"`python -m alignment {run.data.tags.get('overrides', '')}`".replace("  ", " ")])
    header = ["run", "seed", "minutes", CAPABILITY] + [f"{c} share %" for c, _ in singles] + \
        ["joint misaligned % (aligned tokens)", "ratio", "distinct-2", "command"]
    return markdown_table(header, rows)


# ---------------------------------------------------------------- plots (each returns None or why it was skipped)

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


# ---------------------------------------------------------------- markdown

def cell(value, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def change(before, after) -> str:
    """`before → after`, or a single dash when the run measured neither."""
    return "–" if cell(before) == cell(after) == "–" else f"{cell(before)} → {cell(after)}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def write_markdown(frame, guidance, attributes, plots: dict[str, str | None], title: str,
                   mlflow_runs: list | None = None) -> str:
    columns = attributes + ["joint"]
    rows = [r for _, r in frame.iterrows()]
    runs = [[r.task, r.objective, r.label, r.status + ("" if r.complete else f", **incomplete**: {r.missing}"),
             cell(r[CAPABILITY], 3), r.aligned_combination] + [cell(r[f"misaligned_pct/aligned/{a}"]) for a in columns]
            for r in rows]
    # study B's view: the same model unconditioned and conditioned (untagged runs have no conditioned side)
    study_b = [[r.task, r.objective, r.aligned_combination] +
               [change(r[f"misaligned_pct/none/{a}"],
                       r[f"misaligned_pct/aligned/{a}"] if r.aligned_combination != "none" else None)
                for a in columns] for r in rows]
    parts = [f"# {title}", f"{len(frame)} runs, {int(frame.complete.sum())} complete. Misalignment = % of generated "
             "sentences whose level contradicts the conditioning (joint: on any attribute). [low, high]: 95% "
             "interval (one run: Wilson with samples as clusters; several seeds: t interval over seeds)."]
    if mlflow_runs:
        parts += ["## At a glance", headline_table(mlflow_runs, frame)]
        grid, missing = grid_tables(mlflow_runs, frame)
        if grid:
            parts += ["## Study B's grid (seeds pooled; unconditioned → conditioned)", grid]
        if missing:
            parts += ["## Missing", "\n".join(f"- {line}" for line in dict.fromkeys(missing))]
    parts += ["## Runs (aligned conditioning)",
             markdown_table(["task", "objective", "run", "status", CAPABILITY, "conditioning"] +
                            [f"{a} %" for a in columns], runs),
             "## Unconditioned → conditioned (misaligned %, `none` → aligned combination)",
             markdown_table(["task", "objective", "conditioning"] + [f"{a} %" for a in columns], study_b)]
    if not guidance.empty:
        table = guidance[guidance.attribute == "joint"].pivot_table(index="label", columns="guidance",
                                                                    values="misaligned_pct", sort=False)
        table = table[sorted(table.columns)]
        parts += ["## Joint misalignment % vs guidance scale g (aligned combination)",
                  markdown_table(["run"] + [f"g={g:g}" for g in table.columns],
                                 [[label] + [cell(v) for v in values] for label, values in table.iterrows()])]
    parts.append("## Plots")
    parts += [f"![{name}]({name})" if note is None else f"- `{name}` skipped: {note}" for name, note in plots.items()]
    return "\n\n".join(parts) + "\n"


def build_report(client, runs: list, out_dir: Path, title: str) -> Path:
    """Tables and plots of `runs` into `out_dir`; returns the path of report.md."""
    if not runs:
        raise SystemExit("No runs to report on")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(runs)
    attributes = [c.split("/")[-1] for c in frame.columns
                  if c.startswith("misaligned_pct/none/") and not c.endswith(("_low", "_high"))][:-1]  # -joint
    guidance, curves = guidance_frame(runs, frame), curves_frame(client, frame)
    frame.to_csv(out_dir / "runs.csv", index=False)
    if not guidance.empty:
        guidance.to_csv(out_dir / "guidance.csv", index=False)
    plots = {"misalignment_bars.png": plot_bars(frame, attributes, out_dir / "misalignment_bars.png"),
             "alignment_curves.png": plot_curves(curves, out_dir / "alignment_curves.png"),
             "capability_vs_alignment.png": plot_pareto(frame, attributes, out_dir / "capability_vs_alignment.png"),
             "guidance.png": plot_guidance(guidance, out_dir / "guidance.png")}
    report = out_dir / "report.md"
    report.write_text(write_markdown(frame, guidance, attributes, plots, title, runs))
    return report


def sweep_report(tracking_uri: str, parent_id: str, out_dir: Path) -> Path:
    """The report of one sweep's jobs: written to `out_dir`, logged to the parent run, its tables printed."""
    client = mlflow.MlflowClient(tracking_uri)
    parent = get_run(client, parent_id)
    runs = search(client, parent.info.experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'")
    report = build_report(client, runs, out_dir, f"Report: {parent.info.run_name}")
    client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    text = report.read_text()
    print("\n" + text[: text.find("## Runs (aligned conditioning)")].strip())
    print(f"\nReport with plots: {report}  (also in MLflow, run '{parent.info.run_name}', artifacts/report)")
    return report


def main(argv: list[str] | None = None) -> Path:
    runs_dir = default_runs_dir()
    parser = argparse.ArgumentParser(prog="python -m alignment.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="alignment")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", help="the run id of a sweep's parent run: compare its jobs")
    which.add_argument("--runs", help="comma-separated run ids")
    which.add_argument("--last", type=int, help="the N most recent training runs")
    which.add_argument("--name", help="training runs whose name matches this SQL LIKE pattern, e.g. 'ablation-%%'")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                        or f"sqlite:///{runs_dir}/mlflow.db")
    parser.add_argument("--out", type=Path, help="default: <runs>/reports/<timestamp>/")
    parser.add_argument("--into", type=Path, help="also write the report's tables into this markdown file, between "
                        "the lines <!-- report:KEY --> and <!-- /report:KEY --> (KEY from --key)")
    parser.add_argument("--key", default="report", help="the marker name for --into")
    args = parser.parse_args(argv)
    store = args.tracking_uri.removeprefix("sqlite:///")
    if args.tracking_uri.startswith("sqlite:///") and not Path(store).exists():
        raise SystemExit(f"No MLflow store at {store}: train something first (make run)")
    client = mlflow.MlflowClient(args.tracking_uri)
    runs = select_runs(client, args.experiment, args.parent, args.runs.split(",") if args.runs else None, args.last,
                       args.name)
    title = f"Report: {get_run(client, args.parent).info.run_name}" if args.parent else f"Report: {args.experiment}"
    out = args.out or runs_dir / "reports" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    report = build_report(client, runs, out, title)
    if args.into:
        command = "python -m alignment.report " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_between_markers(args.into, args.key, tables_only(report.read_text()), command)
        print(f"Updated {args.into} ({args.key})")
    print(f"Report: {report}\nTable: {out / 'runs.csv'}")
    return report


def tables_only(markdown: str) -> str:
    """The report without its title and plots, headings one level down (to sit inside another document)."""
    body = markdown[markdown.index("\n") + 1: markdown.find("## Plots")].strip()
    return body.replace("\n## ", "\n#### ")


def write_between_markers(path: Path, key: str, text: str, command: str) -> None:
    """Replace what lies between `<!-- report:key -->` and `<!-- /report:key -->` in `path` (both must exist)."""
    start, end = f"<!-- report:{key} -->", f"<!-- /report:{key} -->"
    document = path.read_text()
    if start not in document or end not in document:
        raise SystemExit(f"{path} has no {start} ... {end} block to fill")
    head, rest = document.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\nGenerated by `{command}` on {datetime.now():%Y-%m-%d %H:%M}.\n\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
