"""Runs out of MLflow, and each run's metrics as rows: its aligned conditioning, misalignment and capability."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import mlflow
import pandas as pd

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
            return "none"  # Task.as_trained: untagged objectives are evaluated without tokens
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
                  "misaligned_pct": 100 * m.value, "low": bounds["_low"].get(m.step),
                  "high": bounds["_high"].get(m.step)}
                 for m in joint if m.step in tokens]
    return pd.DataFrame(rows, columns=["label", "tokens_seen", "misaligned_pct", "low", "high"])


def triple(metrics: dict[str, float], combination: str, key: str, guidance: float = 1.0) -> tuple[float, float, float]:
    """(value, low, high) in % of `eval/<combination>/[g<g>/]<key>` and its logged 95% interval."""
    prefix = f"eval/{combination}/" + ("" if guidance == 1.0 else f"g{guidance:g}/") + key
    return tuple(100 * metrics.get(prefix + suffix, float("nan")) for suffix in ("", "_low", "_high"))
