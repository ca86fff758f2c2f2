"""The project's training step (AlignmentModule driven by the Lightning Trainer, default trainer settings) against
a bare PyTorch loop on the same model, batches, optimiser, schedule, precision and clipping.

Both sides train inside one `trainer.fit`: a callback runs one bare step after each Lightning step, so the two sides
alternate step by step and share the machine's load. Lightning's time for a step is everything between the end of
one bare step and the start of the next -- data loading, the step, clipping, logging (MLflow every
`log_every_n_steps`), progress bar, other callbacks -- so nothing the Trainer does per step is left out. Rates are
total tokens over total time (not medians): per-step medians would hide the every-10th-step logging.

`training_phase_vs_bare` widens B to the default run's whole training phase, timed as `time/training` is:
validation, checkpoints, epochs and the set-up inside `fit` included, and B's cycles classed by what they held
(benchmarks.steps).
"""
from __future__ import annotations

import copy
import itertools
import os
import tempfile
import time
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from alignment import CONF_DIR
from alignment.lifecycle import Guard
from alignment.objectives import MLE
from alignment.timing import PhaseTimes
from alignment.train import instantiate_callbacks
from benchmarks.steps import StepTimes

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
        self.scheduler = instantiate(cfg.module.scheduler)(self.optimizer, total_steps=total_steps)
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


def _bench_config(folder: str, overrides: list[str]) -> DictConfig:
    """The default config with `overrides`, every output (MLflow store, checkpoints) under `folder`."""
    return default_config(*overrides, f"paths.mlflow_uri=sqlite:///{folder}/mlflow.db",
                          f"paths.mlflow_artifacts={folder}/mlartifacts", f"trainer.default_root_dir={folder}",
                          f"callbacks.checkpoint.dirpath={folder}/checkpoints")


def _twins(cfg: DictConfig, total_steps: int):
    """The datamodule, the LightningModule and a bare loop on an identical copy of its model, as a run builds them."""
    pl.seed_everything(SEED)
    datamodule = instantiate(cfg.datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(SEED)
    model = instantiate(cfg.module.model)(datamodule.tokenizer, datamodule.task.control_tokens)  # as in a run
    bare = BareLoop(copy.deepcopy(model), cfg, total_steps)
    module = instantiate(cfg.module, model=lambda *_: model, objective=MLE())
    return datamodule, module, bare


def _fit(trainer: pl.Trainer, module, datamodule) -> None:
    # Lightning's MLflow logger sets the process's tracking URI (and MLFLOW_TRACKING_URI): put it back afterwards.
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        mlflow.set_tracking_uri(previous_uri)


def _trainer(cfg: DictConfig, callbacks: list[pl.Callback]) -> pl.Trainer:
    return instantiate(cfg.trainer, logger=instantiate(cfg.logger), callbacks=callbacks)


def lightning_vs_bare(overrides: list[str], steps: int, warmup: int = 3) -> dict:
    """Train `steps` Lightning steps and as many bare ones, interleaved; return both rates (tokens/s), the number
    of timed steps, and whether both sides trained the same batches (the same real tokens step by step).

    `overrides` shrink the default config (the quick mode); the trainer keeps the default's logging, progress bar,
    callbacks, precision and clipping. Validation is switched off: this compares training steps only.
    """
    with tempfile.TemporaryDirectory() as folder:
        cfg = _bench_config(folder, [*overrides, f"trainer.max_steps={steps + warmup}", "trainer.limit_val_batches=0"])
        datamodule, module, bare = _twins(cfg, steps + warmup)
        # Its own loader over the same data: the sampler's seed gives it the same batches in the same order.
        interleave = Interleave(bare, itertools.cycle(datamodule.train_dataloader()), warmup)
        _fit(_trainer(cfg, [interleave, *instantiate_callbacks(cfg)]), module, datamodule)
    tokens = [t for t, _ in interleave.lightning], [t for t, _ in interleave.plain]
    return {"lightning": rate(interleave.lightning), "bare": rate(interleave.plain),
            "steps": len(interleave.lightning), "same_batches": tokens[0] == tokens[1]}


def epochs(loader, limit: int | float = 1.0):
    """A loader's batches epoch after epoch, each epoch in its sampler's order for that epoch (as Lightning calls
    `set_epoch`; `itertools.cycle` would repeat the first epoch's batches) and cut as `trainer.limit_train_batches`
    cuts it (an int: batches, a float: a share)."""
    per_epoch = limit if isinstance(limit, int) else int(len(loader) * limit)
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from itertools.islice(loader, per_epoch)


class BareAfterEach(pl.Callback):
    """After each Lightning step, one bare step on the next batch of its own loader, booked apart by the run's
    PhaseTimes (as `bare`) so that the training phase's time is net of it."""

    def __init__(self, bare: BareLoop, batches, phases: PhaseTimes):
        self.bare, self.batches, self.phases = bare, batches, phases
        self.tokens: list[tuple[int, int]] = []  # (Lightning's, bare) real tokens per step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.phases.phase("bare"):
            self.tokens.append((int(batch["attention_mask"].sum()), self.bare.step(next(self.batches))))


def training_phase_vs_bare(overrides: list[str]) -> dict:
    """The default run's training phase against a bare loop, interleaved step by step in one `fit`: B is `fit` as
    `python -m alignment` runs it -- default callbacks (checkpoints, LR monitor), MLflow logger, progress bar,
    `Guard`, `PhaseTimes`, epochs, `trainer.max_steps` steps -- timed as `time/training` is (validation and the
    alignment curve taken out, and here the bare steps too); A is the bare steps, their loading and collating
    included. Returns both rates (real tokens/s), the steps, whether both trained the same batches, and B's cycles
    by kind (benchmarks.steps.StepTimes).
    """
    with tempfile.TemporaryDirectory() as folder:
        cfg = _bench_config(folder, overrides)
        datamodule, module, bare = _twins(cfg, int(cfg.trainer.max_steps))
        phases, step_times = PhaseTimes(), StepTimes(show=False)  # the bench prints its own table
        batches = epochs(datamodule.train_dataloader(), cfg.trainer.limit_train_batches)
        interleave = BareAfterEach(bare, batches, phases)
        callbacks = [*instantiate_callbacks(cfg), Guard(Path(folder), cfg.seed), phases, interleave, step_times]
        trainer = _trainer(cfg, callbacks)
        phases.lap("set-up")  # as a run's: training is `fit` alone
        _fit(trainer, module, datamodule)
        phases.lap("training")
    tokens = sum(t for t, _ in interleave.tokens)
    return {"run": tokens / phases.seconds["training"], "bare": tokens / phases.seconds["bare"],
            "steps": len(interleave.tokens), "same_batches": all(a == b for a, b in interleave.tokens),
            "kinds": step_times.classes(), "before": step_times.before, "after": step_times.after}
