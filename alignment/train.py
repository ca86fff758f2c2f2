"""One experiment, top to bottom: data -> model -> objective -> Lightning fit -> save -> evaluate.

`run(cfg)` is a plain function of a composed config, so tests call it directly and the Hydra
entry point (`python -m alignment`) is only a thin wrapper around it.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignment import tracking
from alignment.evaluation.callback import AlignmentCurve
from alignment.evaluation.evaluator import describe_effects, evaluate, format_table
from alignment.model import build_model, count_parameters, resize_with_mean_init, save_model, set_generation_defaults
from alignment.model_card import model_card
from alignment.task import Task

log = logging.getLogger(__name__)
TABLE_TITLE = ("Misaligned % of generated sentences (level contradicts the conditioning; a free attribute is judged "
               "against its aligned level), [95% interval]:")


def build_objective(loss_cfg: DictConfig, datamodule):
    """Instantiate the objective, turning a `{quantile: q}` threshold into a number on this corpus."""
    overrides = {}
    if "threshold" in loss_cfg:
        overrides["threshold"] = datamodule.resolve_threshold(OmegaConf.to_container(loss_cfg.threshold, resolve=True)
                                                              if isinstance(loss_cfg.threshold, DictConfig)
                                                              else loss_cfg.threshold)
    return instantiate(loss_cfg, **overrides)


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return its final metrics (for sweepers)."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)

    datamodule = instantiate(cfg.datamodule)
    datamodule.prepare_data()
    tokenizer, meta = datamodule.tokenizer, datamodule.meta
    model = build_model(vocab_size=len(tokenizer), arch=OmegaConf.to_container(cfg.model.arch, resolve=True)
                        if cfg.model.arch is not None else None, pretrained=cfg.model.pretrained,
                        gguf_file=cfg.model.get("gguf_file"), gguf_package=cfg.model.get("gguf_package"))
    resize_with_mean_init(model, tokenizer, tokenizer.convert_tokens_to_ids(meta["control_tokens"]),
                          noise_std=cfg.model.noise_std, seed=cfg.seed)
    objective = build_objective(cfg.objective.loss, datamodule)
    module = instantiate(cfg.module, model=model, objective=objective)
    task = Task.from_config(cfg.task).as_trained(meta, cfg.objective.tagging)

    logger = instantiate(cfg.logger, tags=tracking.run_tags(cfg))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    if cfg.evaluate and cfg.eval.curve.every_n_steps > 0:
        callbacks.append(AlignmentCurve(task, tokenizer, cfg.eval, datamodule.val_sentences(),
                                        cfg.eval.curve.every_n_steps, cfg.eval.curve.num_samples))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if trainer.is_global_zero:
        tracking.log_setup(logger, cfg, meta)
        tracking.log_datasets(logger, cfg, datamodule.folder, meta)
        # The run folder is self-contained: `python -m alignment.evaluate run=<folder>` needs nothing else.
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (output_dir / "dataset.json").write_text(json.dumps(meta, indent=2, default=str))
        (output_dir / "mlflow_run_id").write_text(logger.run_id)
        log.info("Model: %.2fM parameters; data: %s", count_parameters(model) / 1e6,
                 {k: meta["stats"][k] for k in ("train_examples", "train_tokens", "val_examples")})
    if cfg.train:
        trainer.fit(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        return {}  # other DDP ranks stop here; rank 0 saves and evaluates

    results = _scalars(trainer)
    try:
        results.update(save_and_evaluate(cfg, trainer, logger, model, tokenizer, task, datamodule, output_dir))
    except BaseException:
        # fit() already marked the MLflow run FINISHED; a run without its evaluation must not look complete.
        logger.experiment.set_terminated(logger.run_id, "FAILED")
        raise
    logger.finalize("success")
    print(f"\nOutputs: {output_dir}\nMLflow run: {logger.run_id} in experiment '{cfg.logger.experiment_name}'\n"
          + tracking.ui_links(cfg.logger.tracking_uri, logger.experiment_id, logger.run_id))
    return results


def save_and_evaluate(cfg, trainer, logger, model, tokenizer, task, datamodule, output_dir: Path) -> dict[str, float]:
    """After training, on global rank 0: save the model, evaluate it, log and print the results."""
    results: dict[str, float] = {}
    card = partial(model_card, cfg, task, datamodule.meta, steps=trainer.global_step,
                   parameters=count_parameters(model), eos_token=tokenizer.eos_token,
                   command=tracking.reproduce_command())
    if cfg.save_model:
        set_generation_defaults(model, tokenizer.convert_tokens_to_ids(task.control_tokens), cfg.eval.sampling)
        model_dir = save_model(model, tokenizer, output_dir / "model", card=card(metrics=_scalars(trainer)))
        tracking.log_model_dir(logger, model_dir)  # now, so that a failed evaluation still leaves the model
        if cfg.log_mlflow_model:
            tracking.log_mlflow_model(logger, model_dir)
        log.info("Saved model and tokenizer to %s", model_dir)
    if cfg.evaluate:
        model.to(trainer.strategy.root_device).eval()  # Lightning moves the module back to CPU after fit
        evaluation = evaluate(model, tokenizer, task, cfg.eval, datamodule.val_sentences())
        tracking.log_evaluation(logger, evaluation.rows, evaluation.samples, evaluation.capability)
        tracking.log_summary(logger, tracking.summary_metrics(evaluation.rows, task, _scalars(trainer)))
        if cfg.eval.curve.every_n_steps > 0:
            tracking.log_curve_plot(logger)
        table = format_table(evaluation.rows, task)
        effects = describe_effects(evaluation.rows, task)
        (output_dir / "eval_table.txt").write_text(table + "\n\n" + effects + "\n")
        print(f"\n{TABLE_TITLE}\n{table}\n\n{effects}")
        for key, value in evaluation.capability.items():
            print(f"{key}: {value:.4f}")
            results[f"eval/capability/{key}"] = value
        for row in evaluation.rows:
            if row["guidance"] == 1.0:
                results.update({f"eval/{row['combination']}/{k}": v for k, v in row.items()
                                if isinstance(v, (int, float)) and k != "guidance"})
        if cfg.save_model:  # the card again, now with the evaluation table
            (model_dir / "README.md").write_text(card(metrics=_scalars(trainer), eval_table=f"{table}\n\n{effects}"))
            logger.experiment.log_artifact(logger.run_id, str(model_dir / "README.md"), artifact_path="model")
    return results


def _scalars(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
