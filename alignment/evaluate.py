"""`python -m alignment.evaluate run=<run dir | MLflow run id> [eval=prompted] [eval.guidance_scales=[1,2,3]]`

Re-evaluates a trained model with any `eval` config and logs the results into MLflow, as a child
of the evaluated run (default) or into that run itself, without retraining.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import CONF_DIR, tracking

log = logging.getLogger(__name__)


def locate_run(run: str, tracking_uri: str) -> tuple[Path, str | None]:
    """A local run folder (with model/, config.yaml, dataset.json), and the MLflow run id if known.
    Given a run id, its artifacts are downloaded from MLflow."""
    path = Path(run).expanduser()
    if path.is_dir():
        run_id_file = path / "mlflow_run_id"
        return path, run_id_file.read_text().strip() if run_id_file.exists() else None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run, tracking_uri=tracking_uri)
    except mlflow.exceptions.MlflowException as error:
        raise SystemExit(f"run={run!r} is neither a run folder nor a run id in {tracking_uri}: {error}") from error
    return Path(local), run


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

    folder, run_id = locate_run(str(cfg.run), cfg.logger.tracking_uri)
    missing = [name for name in ("model", "config.yaml", "dataset.json") if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"{folder} lacks {missing}: evaluate a run trained with save_model=true")
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
    evaluate_run(cfg)


if __name__ == "__main__":
    main()
