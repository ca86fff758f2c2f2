"""What a run tells its user about MLflow: the UI links, the `_summary/` headline metrics, the environment."""
from __future__ import annotations

import subprocess
import sys
import time
from importlib import metadata
from urllib.parse import parse_qs, urlsplit

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from alignment import PROJECT_ROOT
from alignment.task import Attribute, Task
from alignment.tracking import environment, section_copies, summary_metrics, ui_links


def test_links_for_a_local_store_point_where_make_ui_serves(runs_dir, monkeypatch):  # runs_dir: sets ALIGNMENT_RUNS_DIR
    # make ui follows MLFLOW_TRACKING_URI first; mlflow.set_tracking_uri in an earlier test may have left it set
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    links = ui_links(f"sqlite:///{runs_dir}/mlflow.db", "3", "abc123").splitlines()
    assert links == [
        f"MLflow UI: make ui   (or: mlflow ui --backend-store-uri sqlite:///{runs_dir}/mlflow.db --port 5000), "
        "then open",
        "  this run:   http://127.0.0.1:5000/#/experiments/3/runs/abc123",
        # the classic runs table in the saved view "headline" (the run-defining params and _summary/ metrics)
        "  runs table: http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=headline"]
    # Another store than ALIGNMENT_RUNS_DIR's (logger.tracking_uri=...): make ui must be told.
    assert ui_links("sqlite:////elsewhere/mlflow.db", "3").startswith(
        "MLflow UI: make ui TRACKING_URI=sqlite:////elsewhere/mlflow.db   (or: mlflow ui ")


def test_links_for_a_server_use_its_address_and_compare_the_sweep():
    links = ui_links("http://tracking:5000/", "7", "parent", ["a1", "b2"]).splitlines()
    assert links[:3] == ["MLflow UI:", "  this run:   http://tracking:5000/#/experiments/7/runs/parent",
                         "  runs table: http://tracking:5000/#/experiments/7/runs?workflowType=machine_learning"
                         "&viewStateShareKey=headline"]
    compare = links[3].removeprefix("  compare:    ")
    assert compare.startswith("http://tracking:5000/#/compare-runs?") and '"' not in compare  # clickable as printed
    # The query the UI's compare page reads (MLflow's getCompareRunPageRoute: JSON lists).
    assert parse_qs(urlsplit(compare.replace("#/", "")).query) == {"runs": ['["a1", "b2"]'], "experiments": ['["7"]']}


def two_attribute_task(tagged: list[str]) -> Task:
    toxicity = Attribute("toxicity", None, [0.2], ["<|nontoxic|>", "<|toxic|>"], "<|nontoxic|>")
    sentiment = Attribute("sentiment", None, [-0.05, 0.05], ["<|neg|>", "<|neu|>", "<|pos|>"], "<|pos|>")
    return Task("toxsen", {"toxicity": toxicity, "sentiment": sentiment}, tagged)


def row(combination: str, guidance: float = 1.0, **values) -> dict:
    return {"combination": combination, "guidance": guidance, **{k.replace("__", "/"): v for k, v in values.items()}}


def test_summary_picks_the_headline_rows():
    rows = [row("none", joint__misaligned=0.8, distinct_2=0.9, toxicity__share_toxic=0.05),
            row("untagged", joint__misaligned=0.7),
            row("nontoxic", toxicity__share_nontoxic=0.97), row("toxic", toxicity__share_toxic=0.3),
            row("neg", sentiment__share_neg=0.4), row("neu", sentiment__share_neu=np.nan),  # no sentence: NaN
            row("pos", sentiment__share_pos=0.35),
            row("nontoxic-pos", joint__misaligned=0.6), row("nontoxic-pos", 2.0, joint__misaligned=0.5)]
    trained = {"val/loss": 4.1, "val/loss_untagged": 4.3, "train/loss": 4.0}
    assert summary_metrics(rows, two_attribute_task(["toxicity", "sentiment"]), trained) == {
        "_summary/aligned_misaligned": 0.6, "_summary/unconditioned_misaligned": 0.8, "_summary/distinct_2": 0.9,
        "_summary/nontoxic_under_nontoxic": 0.97, "_summary/toxic_under_toxic": 0.3,
        "_summary/neg_under_neg": 0.4, "_summary/pos_under_pos": 0.35, "_summary/val_loss_untagged": 4.3}


def test_summary_of_an_untagged_run_reads_none_and_its_plain_loss():
    rows = [row("none", joint__misaligned=0.75, distinct_2=0.8)]
    assert summary_metrics(rows, two_attribute_task([]), {"val/loss": 4.5}) == {
        "_summary/aligned_misaligned": 0.75, "_summary/unconditioned_misaligned": 0.75, "_summary/distinct_2": 0.8,
        "_summary/val_loss_untagged": 4.5}


def test_environment_lists_the_installed_versions():
    lines = environment().splitlines()
    assert lines[0].startswith("# python 3.")
    assert f"torch=={metadata.version('torch')}" in lines and f"mlflow=={metadata.version('mlflow')}" in lines


# Four processes open one new sqlite store at the same moment and each logs a run.
_OPEN_AT_ONCE = """
import sys, time
import mlflow
from alignment.tracking import open_store, ensure_experiment
uri, start, locked = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
time.sleep(max(0.0, start - time.time()))
client = open_store(uri) if locked else mlflow.MlflowClient(uri)
run = client.create_run(ensure_experiment(client, "alignment", None))
client.set_terminated(run.info.run_id)
"""


def _open_at_once(uri: str, locked: bool, processes: int = 4) -> list[subprocess.CompletedProcess]:
    start = time.time() + 6  # every process has imported mlflow by then
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, uri, str(start), str(int(locked))],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(processes)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.stdout.read()) for p in procs]


@pytest.mark.slow  # four processes import mlflow: ~20 s idle
def test_processes_opening_a_new_sqlite_store_at_once_all_log_their_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = _open_at_once(uri, locked=True)
    assert [r.returncode for r in results] == [0, 0, 0, 0], "\n".join(r.stdout[-2000:] for r in results)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_sections_that_repeat_another_section_are_not_logged_twice():
    cfg = OmegaConf.create({"task": {"name": "tox", "tagged": ["toxicity"]},
                            "datamodule": {"task": "${task}", "name": "${task.name}", "batch_size": 8}})
    # a whole section by interpolation is a copy; a scalar taken from one is a value of its own
    assert section_copies(cfg) == ["datamodule/task"]
