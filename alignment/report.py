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
from datetime import datetime
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display (Agg canvas)

from alignment import PROJECT_ROOT

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
                last: int | None = None) -> list:
    """The runs to compare: explicit ids, the jobs of one sweep, or (the last N) training runs."""
    if run_ids:
        return [get_run(client, run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"No MLflow experiment named {experiment!r} in {client.tracking_uri}")
    if parent:
        return search(client, found.experiment_id, f"tags.mlflow.parentRunId = '{parent}'")
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
        row[f"misaligned_pct/none/{attr}"] = shares.get(("none", 1.0, attr))
        row[f"misaligned_pct/aligned/{attr}"] = shares.get((aligned, 1.0, attr))
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
                      "misaligned_pct": v} for (g, a), v in sorted(shares.items())]
    return pd.DataFrame(rows, columns=["label", "guidance", "attribute", "misaligned_pct"])


def curves_frame(client, frame: pd.DataFrame) -> pd.DataFrame:
    """The in-training alignment curve of each run's aligned combination against tokens seen."""
    rows = []
    for info in frame.itertuples():
        joint = client.get_metric_history(info.run_id, f"curve/{info.aligned_combination}/joint/misaligned")
        tokens = {m.step: m.value for m in client.get_metric_history(info.run_id, "curve/tokens_seen")}
        rows += [{"label": f"{info.label} [{info.aligned_combination}]", "tokens_seen": tokens[m.step],
                  "misaligned_pct": 100 * m.value} for m in joint if m.step in tokens]
    return pd.DataFrame(rows, columns=["label", "tokens_seen", "misaligned_pct"])


def pareto_front(losses: list[float], misaligned: list[float]) -> list[int]:
    """Indices of the runs no other run beats on both capability (lower loss) and alignment, by loss."""
    order = sorted(range(len(losses)), key=lambda i: (losses[i], misaligned[i]))
    front, best = [], float("inf")
    for i in order:
        if misaligned[i] < best:
            front.append(i)
            best = misaligned[i]
    return front


# ---------------------------------------------------------------- plots (each returns None or why it was skipped)

def plot_bars(frame: pd.DataFrame, attributes: list[str], path: Path) -> str | None:
    measured = frame[frame["misaligned_pct/none/joint"].notna() | frame["misaligned_pct/aligned/joint"].notna()]
    if measured.empty:
        return "no run has evaluation metrics"
    fig = Figure(figsize=(max(6.0, 1.1 * len(measured)), 1 + 3 * len(attributes + ["joint"])), layout="constrained")
    axes = fig.subplots(len(attributes) + 1, 1, sharex=True, squeeze=False)[:, 0]
    x, conditioned = range(len(measured)), measured.aligned_combination != "none"
    for ax, attr in zip(axes, attributes + ["joint"]):
        ax.bar([i - 0.2 for i in x], measured[f"misaligned_pct/none/{attr}"], 0.4, label="none (no control token)")
        ax.bar([i + 0.2 for i in x], measured[f"misaligned_pct/aligned/{attr}"].where(conditioned), 0.4,
               label="aligned control tokens")
        ax.set(title=f"{attr}", ylabel="misaligned sentences (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[-1].set_xticks(list(x), measured.label, rotation=30, ha="right")
    fig.suptitle("Misalignment per run: unconditioned vs conditioned on the aligned tokens")
    fig.savefig(path, dpi=110)


def plot_lines(lines: pd.DataFrame, x: str, path: Path, title: str, xlabel: str, xmin: float | None = None) -> None:
    """One line per run of jointly misaligned % against `x` (tokens seen, guidance scale)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, line in lines.sort_values(x).groupby("label", sort=False):
        ax.plot(line[x], line.misaligned_pct, marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel="jointly misaligned sentences (%)", ylim=(0, None), xlim=(xmin, None))
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


def write_markdown(frame, guidance, attributes, plots: dict[str, str | None], title: str) -> str:
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
             "sentences whose level contradicts the conditioning (joint: on any attribute).",
             "## Runs (aligned conditioning)",
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
    attributes = [c.split("/")[-1] for c in frame.columns if c.startswith("misaligned_pct/none/")][:-1]  # -joint
    guidance, curves = guidance_frame(runs, frame), curves_frame(client, frame)
    frame.to_csv(out_dir / "runs.csv", index=False)
    if not guidance.empty:
        guidance.to_csv(out_dir / "guidance.csv", index=False)
    plots = {"misalignment_bars.png": plot_bars(frame, attributes, out_dir / "misalignment_bars.png"),
             "alignment_curves.png": plot_curves(curves, out_dir / "alignment_curves.png"),
             "capability_vs_alignment.png": plot_pareto(frame, attributes, out_dir / "capability_vs_alignment.png"),
             "guidance.png": plot_guidance(guidance, out_dir / "guidance.png")}
    report = out_dir / "report.md"
    report.write_text(write_markdown(frame, guidance, attributes, plots, title))
    return report


def main(argv: list[str] | None = None) -> Path:
    runs_dir = default_runs_dir()
    parser = argparse.ArgumentParser(prog="python -m alignment.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="alignment")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", help="the run id of a sweep's parent run: compare its jobs")
    which.add_argument("--runs", help="comma-separated run ids")
    which.add_argument("--last", type=int, help="the N most recent training runs")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI")
                        or f"sqlite:///{runs_dir}/mlflow.db")
    parser.add_argument("--out", type=Path, help="default: <runs>/reports/<timestamp>/")
    args = parser.parse_args(argv)
    store = args.tracking_uri.removeprefix("sqlite:///")
    if args.tracking_uri.startswith("sqlite:///") and not Path(store).exists():
        raise SystemExit(f"No MLflow store at {store}: train something first (make run)")
    client = mlflow.MlflowClient(args.tracking_uri)
    runs = select_runs(client, args.experiment, args.parent, args.runs.split(",") if args.runs else None, args.last)
    title = f"Report: {get_run(client, args.parent).info.run_name}" if args.parent else f"Report: {args.experiment}"
    out = args.out or runs_dir / "reports" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    report = build_report(client, runs, out, title)
    print(f"Report: {report}\nTable: {out / 'runs.csv'}")
    return report


if __name__ == "__main__":
    main()
