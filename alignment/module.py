"""The LightningModule: batches in, objective, metrics out.

It builds the causal LM for the datamodule's tokenizer (`configure_model`) and owns the objective
(alignment.objectives). Training logs the objective's parts under `train/`; validation logs plain
LM loss on the tagged validation text (`val/loss`) and on the same text untagged
(`val/loss_untagged`: capability, comparable across objectives).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from alignment.model import count_parameters
from alignment.objectives import IGNORE_INDEX, Objective

log = logging.getLogger(__name__)


def warmup_then_decay(optimizer, total_steps: int, warmup_steps: int = 100, decay: str = "cosine",
                      min_ratio: float = 0.0):
    """Linear warmup, then cosine or linear decay to min_ratio x lr (the studies' schedules), per step.

    Not transformers' `get_scheduler`: its warmup starts at lr 0 (step / warmup, here (step + 1) / warmup) and its
    linear decay has no floor, so every run's learning rates, and numbers, would change."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler decay must be cosine, linear or constant, got {decay!r}")
    warmup_steps = min(warmup_steps, max(total_steps // 10, 1))  # a tiny run must still leave warmup

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if decay == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 if decay == "constant" else min_ratio + (1 - min_ratio) * (1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class AlignmentModule(pl.LightningModule):
    """model: builds the LM for a tokenizer and its control tokens (alignment.model.build_for_tokenizer)."""

    def __init__(self, model: Callable, objective: Objective, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.model_factory, self.objective = model, objective
        self.model: torch.nn.Module | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=True)

    def configure_model(self):
        if self.model is not None:  # Lightning calls this on every fit/validate
            return
        datamodule = self.trainer.datamodule
        self.model = self.model_factory(datamodule.tokenizer, datamodule.task.control_tokens)
        self.objective.configure(self.model.config.hidden_size, datamodule.task)
        log.info("Model: %.2fM parameters", count_parameters(self.model) / 1e6)

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=self.objective.uses_hidden_states)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        hidden = out.hidden_states[-1] if out.hidden_states is not None else None
        loss, metrics = self.objective(out.logits.float(), batch["labels"], batch["scores"], hidden)
        # Tokens seen by all processes together (a sum: the ranks' batches differ in length), the x axis
        # of study A's alignment curves.
        self.tokens_seen += int(self.trainer.strategy.reduce(batch["attention_mask"].sum(), reduce_op="sum"))
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens_seen", self.tokens_seen.float())
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        logits = self(batch).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        # One loader means the validation text has no control tokens: its loss is also the untagged loss.
        single = len(self.trainer.num_val_batches) == 1
        names = (["val/loss", "val/loss_untagged"] if single
                 else ["val/loss" if dataloader_idx == 0 else "val/loss_untagged"])
        for name in names:
            self.log(name, loss, sync_dist=True, add_dataloader_idx=False, prog_bar=name == "val/loss")

    def on_validation_epoch_end(self):
        for name in ("val/loss", "val/loss_untagged"):
            if name in self.trainer.callback_metrics:
                ppl = torch.exp(self.trainer.callback_metrics[name].clamp(max=20))
                self.log(name.replace("loss", "perplexity"), ppl, sync_dist=True)

    def configure_optimizers(self):
        # No weight decay on biases and LayerNorm weights (the 1-D parameters); embeddings decay: nanoGPT's recipe.
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
