"""The comparison report on a real MLflow sqlite store filled the way alignment.train fills it."""
from __future__ import annotations

import math

import matplotlib.image
import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag

from alignment import tracking
from alignment.report import aligned_combination, misalignment, pareto_front
from alignment.report.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOXSEN_PARAMS = {"task/tagged": "['toxicity', 'sentiment']", "task/attributes/toxicity/aligned": "<|nontoxic|>",
                 "task/attributes/sentiment/aligned": "<|pos|>"}


def shares(combination: str, toxicity: float, sentiment: float | None, joint: float, guidance: float = 1.0) -> dict:
    """One evaluation row, as alignment.evaluation.evaluator makes it for one (combination, guidance)."""
    row = {"combination": combination, "guidance": guidance, "toxicity/misaligned": toxicity,
           "joint/misaligned": joint, "toxicity/mean_score": toxicity / 2, "toxicity/judge_misaligned": 0.99,
           "distinct_2": 0.8}
    if sentiment is not None:
        row["sentiment/misaligned"] = sentiment
    return row


def log_run(uri, experiment_id, name, start, tags, params=None, metrics=None, rows=(), curves=None,
            status="FINISHED"):
    """A run as alignment.train leaves it: evaluation rows logged through tracking.log_evaluation (so a change of
    its keys reaches these tests), the rest written directly at chosen times and steps."""
    client = mlflow.MlflowClient(uri)
    task, objective = name.split("-")
    run = client.create_run(experiment_id, run_name=name, start_time=start,
                            tags={"task": task, "objective": objective, **tags})
    batch = [Metric(k, v, start, 0) for k, v in (metrics or {}).items()]
    for step, values in (curves or {}).items():
        batch += [Metric(k, v, start + step, step) for k, v in values.items()]
    client.log_batch(run.info.run_id, metrics=batch, params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag("mlflow.runName", name)])
    if rows:
        logger = tracking.mlflow_logger(tracking_uri=uri, experiment_name="alignment", run_id=run.info.run_id)
        tracking.log_evaluation(logger, list(rows), [])
    client.set_terminated(run.info.run_id, status=status, end_time=start + 1000)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep of four jobs (one failed before evaluating) and one later run outside the sweep."""
    root = tmp_path_factory.mktemp("report_runs")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("alignment", artifact_location=str(root / "mlartifacts"))
    parent = client.create_run(experiment_id, run_name="sweep 12-00-00", start_time=1_000).info.run_id
    child = {"mlflow.parentRunId": parent}
    log_run(uri, experiment_id, "toxsen-conditional", 2_000, child, {**TOXSEN_PARAMS, "objective/tagging": "True"},
            {"val/loss_untagged": 4.2, "val/perplexity_untagged": math.exp(4.2), "train/loss": 4.0},
            [shares("none", 0.30, 0.50, 0.60), shares("nontoxic-pos", 0.10, 0.25, 0.30),
             shares("toxic-neg", 0.90, 0.95, 0.99), shares("nontoxic-pos", 0.05, 0.15, 0.20, guidance=2.0),
             shares("nontoxic-pos", 0.04, 0.10, 0.125, guidance=3.0)],
            curves={s: {"curve/nontoxic-pos/joint/misaligned": j, "curve/none/joint/misaligned": 0.99,
                        "curve/tokens_seen": t} for s, j, t in [(0, 0.7, 0.0), (10, 0.5, 1000.0), (20, 0.3, 2000.0)]})
    log_run(uri, experiment_id, "toxsen-mle", 3_000, child, {**TOXSEN_PARAMS, "objective/tagging": "False"},
            {"val/loss_untagged": 4.0}, [shares("none", 0.40, 0.55, 0.70)],
            curves={s: {"curve/none/joint/misaligned": j, "curve/tokens_seen": t}
                    for s, j, t in [(0, 0.8, 0.0), (10, 0.7, 1000.0)]})
    failed = log_run(uri, experiment_id, "tox-conditional", 4_000, child,
                     {"task/tagged": "['toxicity']", "objective/tagging": "True",
                      "task/attributes/toxicity/aligned": "<|nontoxic|>"}, {"val/loss_untagged": 4.5}, status="FAILED")
    # study A task logged without config params: the aligned combination is recognised by its name
    log_run(uri, experiment_id, "toxicity-conditional", 5_000, child, None, {"val/loss_untagged": 4.4},
            [shares("none", 0.10, None, 0.10), shares("aligned", 0.02, None, 0.02),
             shares("misaligned", 0.60, None, 0.60)])
    log_run(uri, experiment_id, "pii-mle", 6_000, {}, None, {"val/loss_untagged": 3.9})
    client.set_terminated(parent)
    return {"uri": uri, "parent": parent, "failed": failed, "root": root}


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = main(["--tracking-uri", store["uri"], "--parent", store["parent"], "--out", str(out)])
    return report, pd.read_csv(out / "runs.csv").set_index("run_name")


def test_csv_has_one_row_per_job_of_the_sweep_in_study_order(sweep_report):
    _, runs = sweep_report
    assert list(runs.index) == ["tox-conditional", "toxsen-mle", "toxsen-conditional", "toxicity-conditional"]
    assert list(runs.aligned_combination) == ["nontoxic", "none", "nontoxic-pos", "aligned"]


def test_csv_holds_the_logged_numbers_as_percentages(sweep_report):
    _, runs = sweep_report
    cond = runs.loc["toxsen-conditional"]
    assert cond["val/loss_untagged"] == pytest.approx(4.2)
    assert cond["val/perplexity_untagged"] == pytest.approx(math.exp(4.2))
    measures = ("toxicity", "sentiment", "joint")
    assert [cond[f"misaligned_pct/none/{a}"] for a in measures] == pytest.approx([30, 50, 60])
    assert [cond[f"misaligned_pct/aligned/{a}"] for a in measures] == pytest.approx([10, 25, 30])
    mle = runs.loc["toxsen-mle"]  # untagged: its aligned conditioning is `none`
    assert mle["misaligned_pct/aligned/joint"] == mle["misaligned_pct/none/joint"] == pytest.approx(70)
    study_a = runs.loc["toxicity-conditional"]
    assert study_a["misaligned_pct/none/toxicity"] == pytest.approx(10)
    assert study_a["misaligned_pct/aligned/toxicity"] == pytest.approx(2)
    assert math.isnan(study_a["misaligned_pct/aligned/sentiment"])  # no sentiment attribute in that task


def test_failed_run_without_evaluation_is_marked_incomplete(sweep_report, store):
    report, runs = sweep_report
    failed = runs.loc["tox-conditional"]
    assert failed.run_id == store["failed"] and failed.status == "FAILED" and not failed.complete
    assert "no eval of nontoxic" in failed.missing and failed["val/loss_untagged"] == pytest.approx(4.5)
    assert runs.drop("tox-conditional").complete.all()
    assert "FAILED, **incomplete**: run did not finish; no eval of nontoxic" in report.read_text()


def test_markdown_has_the_run_table_the_study_b_table_and_the_guidance_table(sweep_report):
    text = sweep_report[0].read_text()
    assert ("| toxsen | conditional | toxsen-conditional | FINISHED | 4.200 | nontoxic-pos | 10.0 | 25.0 | 30.0 |"
            in text)
    assert "| toxsen | conditional | nontoxic-pos | 30.0 → 10.0 | 50.0 → 25.0 | 60.0 → 30.0 |" in text
    assert "| toxsen | mle | none | 40.0 → – | 55.0 → – | 70.0 → – |" in text
    assert "| toxicity | conditional | aligned | 10.0 → 2.0 | – | 10.0 → 2.0 |" in text
    assert "| run | g=1 | g=2 | g=3 |" in text and "| toxsen-conditional [nontoxic-pos] | 30.0 | 20.0 | 12.5 |" in text
    guidance = pd.read_csv(sweep_report[0].parent / "guidance.csv")
    assert set(guidance.label) == {"toxsen-conditional [nontoxic-pos]"} and len(guidance) == 9  # 3 scales x 3 measures


def test_plots_are_valid_pngs_linked_from_the_report(sweep_report):
    report = sweep_report[0]
    for name in ["misalignment_bars.png", "alignment_curves.png", "capability_vs_alignment.png", "guidance.png"]:
        path = report.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(path).shape[0] > 200
        assert f"![{name}]({name})" in report.read_text()


def test_last_run_outside_the_sweep_defaults_to_runs_dir_and_skips_absent_plots(store, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNMENT_RUNS_DIR", str(store["root"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = main(["--last", "1"])  # tracking uri and output folder from ALIGNMENT_RUNS_DIR
    assert report.parent.parent == store["root"] / "reports" and str(report) in capsys.readouterr().out
    runs = pd.read_csv(report.parent / "runs.csv")
    assert list(runs.run_name) == ["pii-mle"] and not runs.complete[0]
    text = report.read_text()
    assert "`guidance.png` skipped" in text and "`alignment_curves.png` skipped" in text
    assert not (report.parent / "guidance.png").exists()


def test_missing_store_experiment_or_run_is_a_clear_error(tmp_path, store):
    with pytest.raises(SystemExit, match="No MLflow store"):
        main(["--tracking-uri", f"sqlite:///{tmp_path}/absent.db", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="No MLflow experiment named 'other'"):
        main(["--tracking-uri", store["uri"], "--experiment", "other", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="No run 'f00'"):
        main(["--tracking-uri", store["uri"], "--runs", "f00", "--out", str(tmp_path)])


def test_explicit_run_ids_are_reported_whatever_their_sweep(store, tmp_path):
    report = main(["--tracking-uri", store["uri"], "--runs", store["failed"], "--out", str(tmp_path)])
    runs = pd.read_csv(report.parent / "runs.csv")
    assert list(runs.run_name) == ["tox-conditional"]
    assert "`misalignment_bars.png` skipped: no run has evaluation metrics" in report.read_text()


def test_aligned_combination_from_params_or_from_names():
    assert aligned_combination({**TOXSEN_PARAMS, "objective/tagging": "True"}, set()) == "nontoxic-pos"
    assert aligned_combination({**TOXSEN_PARAMS, "objective/tagging": "False"}, {"none"}) == "none"
    assert aligned_combination({"task/tagged": "[]"}, {"none"}) == "none"
    logged = {"none", "nontoxic", "pos", "toxic-pos", "nontoxic-pos", "nontoxic-neg"}
    assert aligned_combination({}, logged) == "nontoxic-pos"
    assert aligned_combination({"task/tagged": "['toxicity', 'sent"}, logged) == "nontoxic-pos"  # truncated param
    assert aligned_combination({}, {"none"}) == "none"


def test_misalignment_parses_combination_guidance_and_attribute():
    parsed = misalignment({"eval/nontoxic-pos/joint/misaligned": 0.25, "eval/pos/g1.5/sentiment/misaligned": 0.5,
                           "eval/none/toxicity/judge_misaligned": 1.0, "eval/capability/kl_from_reference": 2.0,
                           "curve/none/joint/misaligned": 1.0})
    assert parsed == {("nontoxic-pos", 1.0, "joint"): 25.0, ("pos", 1.5, "sentiment"): 50.0}


def test_pareto_front_keeps_runs_no_other_run_beats_on_both_axes():
    losses, misaligned = [4.0, 4.2, 4.1, 4.5, 3.9], [70, 30, 50, 40, 80]
    # 3.9/80 (best loss), 4.0/70, 4.1/50, 4.2/30 (best alignment) trade off; 4.5/40 is beaten by 4.2/30
    assert pareto_front(losses, misaligned) == [4, 0, 2, 1]


def test_tables_into_a_markdown_file_name_the_command_and_the_store(store, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n<!-- report:grid -->\nold\n<!-- /report:grid -->\nafter\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # not the default store: the stamp says which
    main(["--parent", store["parent"], "--out", str(tmp_path / "out"), "--into", str(readme), "--key", "grid"])
    text = readme.read_text()
    assert text.startswith("# Results\n<!-- report:grid -->\nGenerated by `MLFLOW_TRACKING_URI="
                           f"{store['uri']} python -m alignment.report --parent {store['parent']} --out ")
    assert "old" not in text and text.endswith("<!-- /report:grid -->\nafter\n")
    assert "\n#### " in text and "tox-conditional" in text  # the report's tables, headings one level down
