"""MLflow tracking: one run per job, one parent run per sweep, and the artifacts that make a run
reproducible and comparable (resolved config, dataset statistics, metric tables, samples, model).

Lightning's MLFlowLogger logs the curves; this module adds what it does not do. Everything here is
called on global rank 0 only.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from alignment import PROJECT_ROOT

log = logging.getLogger(__name__)
PARENT_FILE = "mlflow_parent_run_id"


class MLflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run for each `-m` sweep, so the UI groups its jobs.

    The parent's id is written into the sweep folder, where every job (in this process, or on a
    cluster node through a launcher) finds it and tags itself `mlflow.parentRunId`.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        self.tracking_uri, self.experiment_name, self.artifact_location = tracking_uri, experiment_name, artifact_location

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client = mlflow.MlflowClient(self.tracking_uri)
        experiment_id = ensure_experiment(client, self.experiment_name, self.artifact_location)
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(experiment_id, run_name=f"sweep {Path(config.hydra.sweep.dir).name}",
                                tags={"sweep.overrides": overrides, "sweep.dir": str(config.hydra.sweep.dir)})
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        (Path(config.hydra.sweep.dir) / PARENT_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if path.exists():
            mlflow.MlflowClient(self.tracking_uri).set_terminated(path.read_text().strip())


def ensure_experiment(client: mlflow.MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # another job created it in the meantime
        return client.get_experiment_by_name(name).experiment_id


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that make runs findable: task, objective, model, data, the sweep parent, the git commit."""
    tags = {"task": cfg.task.name, "objective": cfg.objective.name,
            "model": str(cfg.model.get("name", "")), "data": str(cfg.data.source.get("_target_", "")).split(".")[-1]}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["output_dir"] = hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN:
            parent = Path(hc.sweep.dir) / PARENT_FILE
            if parent.exists():
                tags["mlflow.parentRunId"] = parent.read_text().strip()
            tags["sweep.job"] = str(hc.job.num)
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_setup(logger, cfg: DictConfig, data_meta: dict) -> None:
    """Before training: the resolved config (params are truncated to 250 characters by MLflow,
    the artifact is not), the flattened config as params, and the dataset statistics."""
    client, run_id = logger.experiment, logger.run_id
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    logger.log_hyperparams(flat)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (Path(tmp) / "dataset.json").write_text(json.dumps(data_meta, indent=2, default=str))
        client.log_artifacts(run_id, tmp)
    for key, value in data_meta["stats"].items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, f"data/{key}", float(value))
    for name, thresholds in data_meta["thresholds"].items():
        client.log_param(run_id, f"resolved/thresholds/{name}", json.dumps(thresholds))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        return {f"{prefix}{i}": json.dumps(v) for i, v in enumerate(tree)}
    return {prefix.rstrip("/"): tree}


def log_evaluation(logger, rows: list[dict], samples: list[dict], step: int | None = None) -> None:
    """Metrics per combination, the whole table as CSV/JSON artifacts, and the samples as an MLflow table."""
    client, run_id = logger.experiment, logger.run_id
    for row in rows:
        prefix = f"eval/{row['combination']}" + ("" if row["guidance"] == 1.0 else f"/g{row['guidance']:g}")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "guidance" and value == value:  # skip NaN
                client.log_metric(run_id, f"{prefix}/{key}", float(value), step=step or 0)
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame(rows).to_csv(Path(tmp) / "eval_metrics.csv", index=False)
        (Path(tmp) / "eval_metrics.json").write_text(json.dumps(rows, indent=2, default=float))
        client.log_artifacts(run_id, tmp, artifact_path="eval")
    if samples:
        client.log_table(run_id, data=pd.DataFrame(samples), artifact_file="eval/samples.json")


def log_model_dir(logger, model_dir: Path) -> None:
    logger.experiment.log_artifacts(logger.run_id, str(model_dir), artifact_path="model")


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return f"mlflow ui --backend-store-uri {tracking_uri}   (or: make ui)"
    return f"open {tracking_uri} in a browser"
