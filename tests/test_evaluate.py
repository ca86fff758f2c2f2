"""`python -m alignment.evaluate`: re-evaluate a saved run with another eval config, without retraining."""
from __future__ import annotations

import mlflow
import pytest
import torch

from alignment.evaluate import evaluate_run, pick_device
from alignment.train import run
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


def test_unknown_run_is_a_clear_error(runs_dir, tmp_path):
    ecfg = compose_config(["run=not-a-run"], tmp_path / "eval", config_name="evaluate")
    with pytest.raises(SystemExit, match="neither a run folder nor a run id"):
        evaluate_run(ecfg)


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
    with pytest.raises(SystemExit, match=r"lacks \['model'\]: evaluate a run trained with save_model=true"):
        evaluate_run(ecfg)


def test_the_device_is_the_gpu_when_there_is_one():
    """`device: auto` (conf/evaluate.yaml) samples on CUDA when torch sees a GPU, on this CPU-only CI on the CPU;
    any other value is a torch device name."""
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cpu") == torch.device("cpu")
