"""`python -m alignment.evaluate run=<run dir | MLflow run id> [eval=prompted] [eval.guidance_scales=[1,2,3]]`

Re-evaluates a trained model with any `eval` config and logs the results into MLflow, as a child
of the evaluated run (default) or into that run itself, without retraining.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import CONF_DIR, tracking
from alignment.validation import store_exists, user_errors, validate

log = logging.getLogger(__name__)


#: What a run folder must hold to be evaluated (alignment.train writes them).
NEEDED = ("model", "config.yaml", "dataset.json")
#: What a saved model folder holds besides its weights (alignment.model.save_model: save_pretrained's files).
MODEL_FILES = ("config.json", "tokenizer_config.json")


def run_problems(run: str, tracking_uri: str) -> list[str]:
    """What is wrong with `run=` (alignment.validation, before any model is loaded): a folder must hold NEEDED,
    a run id must be in the store with them among its artifacts."""
    path = Path(run).expanduser()
    if path.is_dir():
        missing = [name for name in NEEDED if not (path / name).exists()]
        return [f"run={run}: the folder lacks {missing}: evaluate a run trained with save_model=true"] if missing \
            else []
    try:
        if not store_exists(tracking_uri):
            raise ValueError("no store there yet")
        client = mlflow.MlflowClient(tracking_uri)
        client.get_run(run)
    except (ValueError, mlflow.exceptions.MlflowException) as error:
        return [f"run={run}: no such folder (working directory {os.getcwd()}) nor an MLflow run id in {tracking_uri} "
                f"({error}); pass a run folder (runs/single/<date>/<time>_<run name>) or its MLflow run id"]
    return _artifact_problems(client, run)


def _artifact_problems(client, run: str) -> list[str]:
    """A run id's artifacts must hold NEEDED, and its model folder the files the model loads from (a folder
    deleted or cut short in the artifact store would otherwise fail inside transformers, with a traceback)."""
    present = {a.path for a in client.list_artifacts(run)}
    missing = [name for name in NEEDED if name not in present]
    if "model" in present:
        model = {Path(a.path).name for a in client.list_artifacts(run, "model")}
        missing += [f"model/{name}" for name in MODEL_FILES if name not in model]
        if not any(name.endswith((".safetensors", ".bin")) for name in model):
            missing.append("model/model.safetensors (the weights)")
    if not missing:
        return []
    info = client.get_run(run)
    folder = info.data.tags.get("output_dir")
    instead = f"evaluate its run folder instead (run={folder}) or " if folder and Path(folder, "model").is_dir() \
        else ""
    return [f"run={run}: the run's artifacts in {info.info.artifact_uri} lack {missing} (trained with "
            f"save_model=false, or deleted since): {instead}train it again with save_model=true"]


def locate_run(run: str, tracking_uri: str) -> tuple[Path, str | None]:
    """A local run folder (with NEEDED), and the MLflow run id if known. Given a run id, its artifacts are
    downloaded from MLflow. `run` passed run_problems."""
    path = Path(run).expanduser()
    if path.is_dir():
        run_id_file = path / "mlflow_run_id"
        return path, run_id_file.read_text().strip() if run_id_file.exists() else None
    return Path(mlflow.artifacts.download_artifacts(run_id=run, tracking_uri=tracking_uri)), run


def pick_device(name: str):
    """`auto`: the GPU if there is one (CUDA, else Apple's MPS), else the CPU; any other name is torch's."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def evaluate_run(cfg: DictConfig) -> list[dict]:
    from alignment.evaluation.evaluator import describe_effects, evaluate, format_table
    from alignment.task import Task
    from alignment.train import TABLE_TITLE

    validate(cfg)  # every option and the run, before any model is loaded
    folder, run_id = locate_run(str(cfg.run), cfg.logger.tracking_uri)
    trained = OmegaConf.load(folder / "config.yaml")
    meta = json.loads((folder / "dataset.json").read_text())
    task = Task.from_config(trained.task).as_trained(meta, trained.objective.tagging)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    device = pick_device(str(cfg.device))
    log.info("Evaluating %s on %s", folder / "model", device)
    model = AutoModelForCausalLM.from_pretrained(folder / "model").to(device).eval()
    val_sentences = []
    if cfg.eval.mode == "prompted":  # prompts are the trained run's held-out sentences (its dataset cache)
        datamodule = instantiate(trained.datamodule)
        datamodule.prepare_data()
        val_sentences = datamodule.val_sentences()

    result = evaluate(model, tokenizer, task, cfg.eval, val_sentences)
    table = format_table(result.rows, task) + "\n\n" + describe_effects(result.rows, task)
    print(f"\n{TABLE_TITLE}\n{table}")

    tags = {"evaluated_run": str(cfg.run), "task": task.name, "objective": trained.objective.name}
    if run_id and cfg.child_run:
        tags["mlflow.parentRunId"] = run_id
    logger_kwargs = {"run_id": run_id} if run_id and not cfg.child_run else {"tags": tags}
    logger = instantiate(cfg.logger, **logger_kwargs)
    if logger_kwargs.get("tags"):  # a new run: the eval settings are its params (an old run's params are frozen)
        logger.log_hyperparams(tracking.flatten({"eval": OmegaConf.to_container(cfg.eval, resolve=True)}))
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(cfg.eval, resolve=True), "eval/evaluate_config.yaml")
    tracking.log_evaluation(logger, result.rows, result.samples, result.capability)
    logger.finalize("success")
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "eval_table.txt").write_text(table + "\n")
    print(f"\nLogged to MLflow run {logger.run_id}; table in {out / 'eval_table.txt'}\n"
          + tracking.ui_links(cfg.logger.tracking_uri, logger.experiment_id, logger.run_id))
    return result.rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        evaluate_run(cfg)


if __name__ == "__main__":
    main()
