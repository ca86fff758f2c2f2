"""`python -m alignment.evaluate`: re-evaluate a saved run with another eval config, without retraining."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch

from alignment import PROJECT_ROOT
from alignment.evaluate import evaluate_run, pick_device
from alignment.train import run
from alignment.validation import ConfigError
from tests.conftest import compose_config

SMALL_EVAL = ["eval.num_samples=3", "eval.sampling.max_new_tokens=6", "eval.sampling.min_new_tokens=2"]


@pytest.fixture
def trained(tiny_config, tmp_path):
    cfg = tiny_config()
    run(cfg)
    return cfg, tmp_path / "out", (tmp_path / "out" / "mlflow_run_id").read_text().strip()


def test_prompted_eval_with_guidance_as_a_child_run(trained, tmp_path, capsys):
    cfg, folder, run_id = trained
    ecfg = compose_config([f"run={folder}", "eval=prompted", "eval.guidance_scales=[1,2]",
                           "eval.control_placement=after", *SMALL_EVAL], tmp_path / "eval", config_name="evaluate")
    rows = evaluate_run(ecfg)
    by_g = {g: [r["combination"] for r in rows if r["guidance"] == g] for g in (1.0, 2.0)}
    assert "none" in by_g[1.0] and "none" not in by_g[2.0]  # guidance needs a condition to contrast with
    assert set(by_g[2.0]) == set(by_g[1.0]) - {"none", "untagged"}  # rows without a control token
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1
    metrics = children[0].data.metrics
    assert "eval/nontoxic-pos/g2/joint/misaligned" in metrics and "eval/none/joint/misaligned" in metrics
    assert (tmp_path / "eval" / "eval_table.txt").exists()
    experiment_id = children[0].info.experiment_id
    assert (f"this run:   http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{children[0].info.run_id}\n"
            in capsys.readouterr().out)


def test_by_mlflow_run_id_into_the_same_run(trained, tmp_path):
    cfg, _, run_id = trained
    ecfg = compose_config([f"run={run_id}", "child_run=false", "eval.guidance_scales=[3]", *SMALL_EVAL],
                          tmp_path / "eval", config_name="evaluate")
    evaluate_run(ecfg)
    metrics = mlflow.MlflowClient(cfg.logger.tracking_uri).get_run(run_id).data.metrics
    assert "eval/nontoxic-pos/g3/joint/misaligned" in metrics


def test_by_mlflow_run_id_as_a_child_run_with_the_model_from_the_store(trained, tmp_path):
    cfg, folder, run_id = trained
    folder.rename(tmp_path / "moved")  # the run folder is gone: the model can only come from the artifact store
    ecfg = compose_config([f"run={run_id}", "eval.guidance_scales=[1]", *SMALL_EVAL], tmp_path / "eval",
                          config_name="evaluate")
    evaluate_run(ecfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.data.tags["evaluated_run"] == run_id and child.info.status == "FINISHED"
    assert "eval/nontoxic-pos/joint/misaligned" in child.data.metrics
    # The trained run keeps the one evaluation its training made; the new one went into the child alone.
    assert len(client.get_metric_history(run_id, "eval/nontoxic-pos/joint/misaligned")) == 1


def test_a_run_id_whose_model_is_gone_says_what_is_missing_and_what_to_do(trained, tmp_path):
    cfg, folder, run_id = trained
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    model = Path(urlparse(artifact_uri).path) / "model"
    (model / "model.safetensors").unlink()  # the weights alone: the folder itself is still listed
    ecfg = compose_config([f"run={run_id}"], tmp_path / "eval", config_name="evaluate")
    with pytest.raises(ConfigError) as error:
        evaluate_run(ecfg)
    assert error.value.problems == [
        f"run={run_id}: the run's artifacts in {artifact_uri} lack ['model/model.safetensors (the weights)'] "
        f"(trained with save_model=false, or deleted since): evaluate its run folder instead (run={folder}) or "
        "train it again with save_model=true"]

    # The whole model folder, and the run folder moved away: the command says so alone, and leaves no folder.
    shutil.rmtree(model)
    folder.rename(tmp_path / "moved")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), MLFLOW_TRACKING_URI=cfg.logger.tracking_uri,
               ALIGNMENT_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "alignment.evaluate", f"run={run_id}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "Error: Invalid configuration, nothing was run:",
        f"  run={run_id}: the run's artifacts in {artifact_uri} lack ['model'] (trained with save_model=false, or "
        "deleted since): train it again with save_model=true"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["single"]  # no run folder, no date folder


EVALUATE_BAD_INPUTS = [  # (overrides, the one problem named), all caught before any model is loaded
    (["eval.sampling.top_p=0"], "eval.sampling.top_p=0: must be a number in (0, 1]"),
    (["eval.mode=promptd"], "eval.mode='promptd': must be one of unconditional, prompted"),
    (["eval.guidance_scales=[abc]"],
     "eval.guidance_scales=['abc']: must be a non-empty list of numbers, e.g. [1.0, 2.0]"),
    (["eval.sampling.min_new_tokens=10", "eval.sampling.max_new_tokens=4"],
     "eval.sampling.min_new_tokens=10: must be <= eval.sampling.max_new_tokens=4"),
    (["child_run=maybe"], "child_run='maybe': must be true or false"),
    (["device=gpu0"], "device='gpu0': must be auto or a torch device: cpu, cuda, cuda:1, mps"),
    (["eval.reference.path=./no/such/model"],
     f"eval.reference.path=./no/such/model: the folder does not exist (working directory {os.getcwd()})"),
]


@pytest.mark.parametrize(("overrides", "expected"), EVALUATE_BAD_INPUTS,
                         ids=[" ".join(o) for o, _ in EVALUATE_BAD_INPUTS])
def test_a_bad_option_stops_the_evaluation_before_the_model_is_read(runs_dir, tmp_path, overrides, expected):
    # The run folder is empty but for an unreadable model: reading it would fail otherwise.
    folder = tmp_path / "trained"
    (folder / "model").mkdir(parents=True)
    for name in ("config.yaml", "dataset.json", "model/model.safetensors"):
        (folder / name).write_text("not read")
    store = tmp_path / "mlflow.db"
    ecfg = compose_config([f"run={folder}", f"logger.tracking_uri=sqlite:///{store}", *overrides], tmp_path / "eval",
                          config_name="evaluate")
    with pytest.raises(ConfigError) as error:
        evaluate_run(ecfg)
    assert error.value.problems == [expected]
    assert not store.exists() and sorted(p.name for p in (tmp_path / "eval").iterdir()) == []


def test_an_unknown_run_is_a_clear_error(runs_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ecfg = compose_config(["run=not-a-run", f"logger.tracking_uri={store}"], tmp_path / "eval", config_name="evaluate")
    with pytest.raises(ConfigError) as error:
        evaluate_run(ecfg)
    assert error.value.problems == [
        f"run=not-a-run: no such folder (working directory {os.getcwd()}) nor an MLflow run id in {store} (no store "
        "there yet); pass a run folder (runs/single/<date>/<time>_<run name>) or its MLflow run id"]
    assert not (tmp_path / "mlflow.db").exists()
    ecfg = compose_config([f"logger.tracking_uri={store}"], tmp_path / "eval", config_name="evaluate")
    with pytest.raises(ConfigError, match=r"run is required \(it is \?\?\?\): a run folder or an MLflow run id"):
        evaluate_run(ecfg)


def test_the_evaluate_command_prints_the_message_without_a_traceback(tmp_path):
    env = dict(os.environ, ALIGNMENT_RUNS_DIR=str(tmp_path), PYTHONPATH=str(PROJECT_ROOT))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "alignment.evaluate", f"run={tmp_path}", "eval.mode=promptd"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[:2] == ["Error: Invalid configuration, nothing was run:",
                                            "  eval.mode='promptd': must be one of unconditional, prompted"]
    assert "Traceback" not in done.stderr and not (tmp_path / "mlflow.db").exists()


def test_failed_evaluation_marks_the_run_failed_and_a_run_without_model_is_not_reevaluated(tiny_config, tmp_path):
    # Training succeeds (the run stays RUNNING), then the evaluation fails on an unknown conditioning.
    cfg = tiny_config("save_model=false", "eval.curve.every_n_steps=0", "eval.combinations=[positive]")
    with pytest.raises(ValueError, match="not conditionings of task 'toxsen'"):
        run(cfg)
    folder = tmp_path / "out"
    mlrun = mlflow.MlflowClient(cfg.logger.tracking_uri).get_run((folder / "mlflow_run_id").read_text().strip())
    assert mlrun.info.status == "FAILED" and "val/loss" in mlrun.data.metrics
    assert mlrun.data.tags["failure"].startswith("ValueError: eval.combinations: ['positive'] are not conditionings")
    assert not any(key.startswith("eval/") for key in mlrun.data.metrics)
    # Its folder has the config and the dataset but no model: re-evaluating it says why it cannot.
    ecfg = compose_config([f"run={folder}", *SMALL_EVAL], tmp_path / "eval", config_name="evaluate")
    with pytest.raises(ConfigError) as error:
        evaluate_run(ecfg)
    assert error.value.problems == [f"run={folder}: the folder lacks ['model']: evaluate a run trained with "
                                    "save_model=true"]


def test_the_device_is_the_gpu_when_there_is_one():
    """`device: auto` (conf/evaluate.yaml) samples on CUDA when torch sees a GPU, on this CPU-only CI on the CPU;
    any other value is a torch device name."""
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cpu") == torch.device("cpu")
