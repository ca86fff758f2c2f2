"""One experiment, top to bottom: data -> model + objective -> Lightning fit -> save -> evaluate.

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

from alignment import lifecycle, resume, tracking
from alignment.evaluation.evaluator import describe_effects, evaluate, format_table
from alignment.model import count_parameters, save_model, set_generation_defaults
from alignment.model_card import model_card
from alignment.timing import PhaseTimes
from alignment.validation import validate

log = logging.getLogger(__name__)
TABLE_TITLE = ("Misaligned % of generated sentences (level contradicts the conditioning; a free attribute is judged "
               "against its aligned level), [95% interval]:")


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return its final metrics (for sweepers)."""
    validate(cfg)  # every option, before anything is built, cached or logged
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    phases = PhaseTimes()  # the clock starts: time per phase in MLflow (time/...) and at the end of the run

    datamodule = instantiate(cfg.datamodule)
    datamodule.prepare_data()
    # Building the data draws random numbers, reading it from the cache does not: seeded again, the model's
    # initial weights do not depend on whether the dataset was cached (a resumed run's is).
    pl.seed_everything(cfg.seed, workers=True)
    phases.lap("data")
    module = instantiate(cfg.module)  # builds its LM in configure_model, from the datamodule's tokenizer

    resumed = resume.locate(cfg.get("resume"), output_dir)
    logger = instantiate(cfg.logger, **({"run_id": resumed.run_id} if resumed else {"tags": tracking.run_tags(cfg)}))
    guard = lifecycle.Guard(output_dir, cfg.seed)  # NaN/inf loss, SIGTERM, RNG: always on, whatever the callbacks
    callbacks = instantiate_callbacks(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks + [guard, phases])
    with lifecycle.run_status(logger, guard, active=trainer.is_global_zero):
        if trainer.is_global_zero and resumed:
            logger.skip_logged()
            log.info("Resuming MLflow run %s in %s from %s", resumed.run_id, output_dir, resumed.checkpoint)
        elif trainer.is_global_zero:
            tracking.log_setup(logger, cfg, datamodule.meta)
            tracking.log_datasets(logger, cfg, datamodule.folder, datamodule.meta)
            # The run folder is self-contained: `python -m alignment.evaluate run=<folder>` needs nothing else.
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            (output_dir / "dataset.json").write_text(json.dumps(datamodule.meta, indent=2, default=str))
            (output_dir / "mlflow_run_id").write_text(logger.run_id)
        phases.lap("setup")
        if cfg.train:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resumed.checkpoint if resumed else None)
        else:
            trainer.validate(module, datamodule=datamodule)  # builds the model; its validation loss untrained
        phases.lap("training")
        if not trainer.is_global_zero:
            return {}  # other DDP ranks stop here; rank 0 saves and evaluates
        results = _scalars(trainer)
        results.update(save_and_evaluate(cfg, trainer, logger, module.model, datamodule, output_dir, phases))
        tracking.log_summary(logger, phases.metrics())
    print(f"\n{phases.summary()}")
    print(f"\nOutputs: {output_dir}\nMLflow run: {logger.run_id} in experiment '{cfg.logger.experiment_name}'\n"
          + tracking.ui_links(cfg.logger.tracking_uri, logger.experiment_id, logger.run_id))
    return results


def save_and_evaluate(cfg, trainer, logger, model, datamodule, output_dir: Path,
                      phases: PhaseTimes | None = None) -> dict[str, float]:
    """After training, on global rank 0: save the model, evaluate it, log and print the results (and book the
    time of both in `phases`)."""
    phases = phases or PhaseTimes()
    results: dict[str, float] = {}
    task, tokenizer = datamodule.task, datamodule.tokenizer
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
        phases.lap("saving")
    if cfg.evaluate:
        model.to(trainer.strategy.root_device).eval()  # Lightning moves the module back to CPU after fit
        evaluation = evaluate(model, tokenizer, task, cfg.eval, datamodule.val_sentences())
        tracking.log_evaluation(logger, evaluation.rows, evaluation.samples, evaluation.capability)
        summary = tracking.summary_metrics(evaluation.rows, task, _scalars(trainer))
        tracking.log_summary(logger, summary)
        results.update(summary)  # the headline numbers, also for a sweeper's optimized_metric
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
        phases.lap("evaluation")
    return results


def instantiate_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of `cfg.callbacks` (a group whose entries may be null or switched off without a _target_)."""
    return [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]


def _scalars(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
