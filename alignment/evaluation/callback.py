"""The alignment curve: evaluate a small sample every N training steps and at the end, so MLflow
shows misalignment against tokens seen during training, as study A's figures do."""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from alignment.evaluation.evaluator import evaluate
from alignment.timing import PhaseTimes

log = logging.getLogger(__name__)


class AlignmentCurve(pl.Callback):
    """A cheap copy of the final evaluation (`eval`): `num_samples` per combination, no guidance sweep, no KL.
    every_n_steps = 0 turns it off. The task, tokenizer and prompts come from the trainer's datamodule."""

    def __init__(self, eval_cfg: DictConfig, every_n_steps: int, num_samples: int, combinations="all"):
        if every_n_steps < 0 or num_samples <= 0:
            raise ValueError("eval.curve.every_n_steps must be >= 0 and eval.curve.num_samples positive")
        self.every_n_steps = every_n_steps
        self.cfg = copy.deepcopy(eval_cfg)
        with open_dict(self.cfg):
            self.cfg.num_samples = num_samples
            self.cfg.guidance_scales = [1.0]
            self.cfg.combinations = combinations
            self.cfg.reference = None  # the KL from a reference model is for the final evaluation only
        self.last_step = -1
        self.phases = None  # the run's alignment.timing.PhaseTimes, if any: books the curve's time apart from training

    def setup(self, trainer, pl_module, stage):
        datamodule = trainer.datamodule
        self.task, self.tokenizer = datamodule.task, datamodule.tokenizer
        self.val_sentences = datamodule.val_sentences() if self.every_n_steps else []
        self.phases = next((c for c in trainer.callbacks if isinstance(c, PhaseTimes)), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 \
                and trainer.global_step != self.last_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.every_n_steps and trainer.global_step != self.last_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module):
        self.last_step = trainer.global_step
        if not trainer.is_global_zero or trainer.logger is None:
            return
        was_training = pl_module.training
        log.info("Alignment curve at step %d (%d tokens seen)", trainer.global_step, int(pl_module.tokens_seen))
        with self.phases.phase("curve") if self.phases is not None else nullcontext():
            result = evaluate(pl_module.model, self.tokenizer, self.task, self.cfg, self.val_sentences)
        pl_module.train(was_training)
        metrics = {"curve/tokens_seen": float(pl_module.tokens_seen)}
        for row in result.rows:
            for key in ["joint/misaligned"] + [f"{a}/misaligned" for a in self.task.attributes]:
                for suffix in ("", "_low", "_high"):  # the share and its 95% interval
                    metrics[f"curve/{row['combination']}/{key}{suffix}"] = row.get(f"{key}{suffix}", float("nan"))
        trainer.logger.log_metrics({k: v for k, v in metrics.items() if v == v}, step=trainer.global_step)
