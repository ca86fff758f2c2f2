"""A report: tables and plots of some runs into a folder (report.md, runs.csv, PNGs), and a sweep's report."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import mlflow

from alignment.report.plots import plot_bars, plot_curves, plot_guidance, plot_pareto
from alignment.report.query import CAPABILITY, curves_frame, get_run, guidance_frame, runs_frame, search
from alignment.report.tables import cell, change, grid_tables, headline_table, markdown_table

# Two views of "unconditioned -> conditioned" that differ on purpose: study B read each column under the tokens it
# names (toxicity under <|nontoxic|> alone, sentiment under <|pos|> alone, joint under both); the generic table reads
# every column under the run's full aligned combination. The headings say which is which.
GRID_HEADING = "Study B's grid (seeds pooled; unconditioned → conditioned on the tokens each column names)"
GRID_NOTE = ("A model is read only under tokens it trained on (–: it has none). Study B also read its none, tox and "
             "sen models under tokens they never trained on (one shared tokenizer); those cells cannot be reproduced "
             "here by construction.")
ALIGNED_HEADING = ("Unconditioned → conditioned on the full aligned combination (misaligned %; every column under "
                   "the row's `conditioning`)")


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
            parts += [f"## {GRID_HEADING}", grid, GRID_NOTE]
        if missing:
            parts += ["## Missing", "\n".join(f"- {line}" for line in dict.fromkeys(missing))]
    parts += ["## Runs (aligned conditioning)",
             markdown_table(["task", "objective", "run", "status", CAPABILITY, "conditioning"] +
                            [f"{a} %" for a in columns], runs),
             f"## {ALIGNED_HEADING}",
             markdown_table(["task", "objective", "conditioning"] + [f"{a} %, none → conditioning" for a in columns],
                            study_b)]
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


def sweep_report(tracking_uri: str, parent_id: str, out_dir: Path) -> tuple[Path, list]:
    """The report of one sweep's jobs: written to `out_dir`, logged to the parent run, its tables printed.
    Returns report.md and the jobs' runs, newest first."""
    client = mlflow.MlflowClient(tracking_uri)
    parent = get_run(client, parent_id)
    runs = search(client, parent.info.experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'")
    report = build_report(client, runs, out_dir, f"Report: {parent.info.run_name}")
    client.log_artifacts(parent_id, str(out_dir), artifact_path="report")
    text = report.read_text()
    print("\n" + text[: text.find("## Runs (aligned conditioning)")].strip())
    print(f"\nReport with plots: {report}  (also in MLflow, run '{parent.info.run_name}', artifacts/report)")
    return report, runs


def curve_plot(client, run_id: str, path: Path) -> str | None:
    """One run's alignment curve (its aligned conditioning, as in a report) into `path`; None, or why not."""
    return plot_curves(curves_frame(client, runs_frame([get_run(client, run_id)])), path)



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
    stamp = f"Generated by `{command}` on {datetime.now():%Y-%m-%d %H:%M}."
    path.write_text(f"{head}{start}\n{stamp}\n\n{text}\n{end}{tail}")

