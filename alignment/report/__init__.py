"""`python -m alignment.report [--parent ID | --runs ID,ID | --last N]`: compare runs tracked in MLflow.

Writes `report.md` (tables of capability and misalignment, study B's "unconditioned -> conditioned"
view, misalignment vs guidance), `runs.csv` with the same numbers, and PNG plots next to them.

Each run is judged under its *aligned conditioning*: the prompt a user would give to get aligned text
(`nontoxic-pos` for a toxsen run, `aligned` for a study A run), or `none` when the run was trained
without control tokens. Runs that failed or lack metrics are listed and marked, never dropped.
"""
from __future__ import annotations

from alignment.report.build import build_report, sweep_report
from alignment.report.plots import pareto_front
from alignment.report.query import aligned_combination, misalignment

__all__ = ["aligned_combination", "build_report", "misalignment", "pareto_front", "sweep_report"]
