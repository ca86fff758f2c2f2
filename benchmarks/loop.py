"""The project's training step (AlignmentModule driven by the Lightning Trainer, default trainer settings) against
a bare PyTorch loop on the same model, batches, optimiser, schedule, precision and clipping.

Both sides train inside one `trainer.fit`: a callback runs one bare step after each Lightning step, so the two sides
alternate step by step and share the machine's load. Lightning's time for a step is everything between the end of
one bare step and the start of the next -- data loading, the step, clipping, logging (MLflow every
`log_every_n_steps`), progress bar, other callbacks -- so nothing the Trainer does per step is left out. Rates are
total tokens over total time (not medians): per-step medians would hide the every-10th-step logging.
"""
from __future__ import annotations

import copy
import itertools
import os
import tempfile
import time

import mlflow
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignment import CONF_DIR
from alignment.module import warmup_then_decay
from alignment.objectives import MLE

SEED = 0


def default_config(*overrides: str) -> DictConfig:
    """conf/config.yaml as `python -m alignment <overrides>` composes it (without Hydra's runtime node)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


class BareLoop:
    """What a user would write instead of Lightning: forward, loss, backward, clip, AdamW, schedule step."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, total_steps: int):
        self.model = model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = instantiate(cfg.module.optimizer)([{"params": decay},
                                                            {"params": no_decay, "weight_decay": 0.0}])
        schedule = OmegaConf.to_container(cfg.module.scheduler)
        schedule = {k: v for k, v in schedule.items() if not k.startswith("_")}
        self.scheduler = warmup_then_decay(self.optimizer, total_steps, **schedule)
        self.clip = cfg.trainer.gradient_clip_val
        self.bf16 = cfg.trainer.precision == "bf16-mixed"
        self.objective = MLE()

    def step(self, batch: dict[str, torch.Tensor]) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _ = self.objective(logits.float(), batch["labels"])
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return int(batch["attention_mask"].sum())


class Interleave(pl.Callback):
    """After each Lightning step, one bare step on the next batch of its own loader; times both."""

    def __init__(self, bare: BareLoop, batches, warmup: int):
        self.bare, self.batches, self.warmup = bare, batches, warmup
        self.lightning: list[tuple[int, float]] = []  # (tokens, seconds) per step
        self.plain: list[tuple[int, float]] = []
        self.bare_loss: list[float] = []
        self._resumed: float | None = None  # when Lightning got control back

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._resumed is not None and trainer.global_step > self.warmup:
            self.lightning.append((int(batch["attention_mask"].sum()), now - self._resumed))
        start = time.perf_counter()
        tokens = self.bare.step(next(self.batches))
        if trainer.global_step > self.warmup:
            self.plain.append((tokens, time.perf_counter() - start))
        self._resumed = time.perf_counter()


def rate(measurements: list[tuple[int, float]]) -> float:
    return sum(t for t, _ in measurements) / sum(s for _, s in measurements)


def lightning_vs_bare(overrides: list[str], steps: int, warmup: int = 3) -> dict:
    """Train `steps` Lightning steps and as many bare ones, interleaved; return both rates (tokens/s), the number
    of timed steps, and whether both sides trained the same batches (the same real tokens step by step).

    `overrides` shrink the default config (the quick mode); the trainer keeps the default's logging, progress bar,
    callbacks, precision and clipping. Validation is switched off: this compares training steps only.
    """
    with tempfile.TemporaryDirectory() as folder:
        cfg = default_config(*overrides, f"paths.mlflow_uri=sqlite:///{folder}/mlflow.db",
                             f"paths.mlflow_artifacts={folder}/mlartifacts", f"trainer.default_root_dir={folder}",
                             f"callbacks.checkpoint.dirpath={folder}/checkpoints",
                             f"trainer.max_steps={steps + warmup}", "trainer.limit_val_batches=0")
        pl.seed_everything(SEED)
        datamodule = instantiate(cfg.datamodule)
        datamodule.prepare_data()
        datamodule.setup("fit")
        torch.manual_seed(SEED)
        model = instantiate(cfg.module.model)(datamodule.tokenizer, datamodule.task.control_tokens)  # as in a run
        twin = copy.deepcopy(model)
        module = instantiate(cfg.module, model=lambda *_: model, objective=MLE())
        # Its own loader over the same data: the sampler's seed gives it the same batches in the same order.
        bare_batches = itertools.cycle(datamodule.train_dataloader())
        interleave = Interleave(BareLoop(twin, cfg, steps + warmup), bare_batches, warmup)
        callbacks = [interleave] + [instantiate(c) for c in cfg.callbacks.values() if c and "_target_" in c]
        logger = instantiate(cfg.logger)
        trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
        # Lightning's MLflow logger sets the process's tracking URI (and MLFLOW_TRACKING_URI): put it back afterwards.
        previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            mlflow.set_tracking_uri(previous_uri)
    tokens = [t for t, _ in interleave.lightning], [t for t, _ in interleave.plain]
    return {"lightning": rate(interleave.lightning), "bare": rate(interleave.plain),
            "steps": len(interleave.lightning), "same_batches": tokens[0] == tokens[1]}
