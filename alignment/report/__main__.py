"""`python -m alignment.report [--parent ID | --runs ID,ID | --last N]`: compare runs tracked in MLflow.

Writes `report.md` (tables of capability and misalignment, study B's "unconditioned -> conditioned"
view, misalignment vs guidance), `runs.csv` with the same numbers, and PNG plots next to them.

Each run is judged under its *aligned conditioning*: the prompt a user would give to get aligned text
(`nontoxic-pos` for a toxsen run, `aligned` for a study A run), or `none` when the run was trained
without control tokens. Runs that failed or lack metrics are listed and marked, never dropped.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import mlflow

from alignment.report.build import build_report, tables_only, write_between_markers
from alignment.report.query import default_runs_dir, get_run, select_runs


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
        if "--tracking-uri" not in command and args.tracking_uri != f"sqlite:///{runs_dir}/mlflow.db":
            command = f"MLFLOW_TRACKING_URI={args.tracking_uri} {command}"  # the store, when not the default one
        write_between_markers(args.into, args.key, tables_only(report.read_text()), command)
        print(f"Updated {args.into} ({args.key})")
    print(f"Report: {report}\nTable: {out / 'runs.csv'}")
    return report


if __name__ == "__main__":
    main()
