"""The LightningModule: batches in, objective, metrics out.

It builds the causal LM for the datamodule's tokenizer (`configure_model`) and owns the objective
(alignment.objectives). Training logs the objective's parts under `train/`; validation logs plain
LM loss on the tagged validation text (`val/loss`) and on the same text untagged
(`val/loss_untagged`: capability, comparable across objectives).
"""
from __future__ import annotations

import logging
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import get_scheduler

from alignment.model import count_parameters
from alignment.objectives import IGNORE_INDEX, Objective

log = logging.getLogger(__name__)


def warmup_then_decay(optimizer, total_steps: int, name: str = "cosine_with_min_lr", warmup_steps: int = 100,
                      **schedule_kwargs):
    """transformers' schedule `name` (`get_scheduler`: linear, cosine, cosine_with_min_lr, ...) over the run's
    optimizer steps. `schedule_kwargs` go to it as they are (cosine_with_min_lr: `min_lr_rate`), null ones left out.
    The warmup is capped at a tenth of the run, so a tiny run still leaves it."""
    schedule_kwargs = {k: v for k, v in schedule_kwargs.items() if v is not None}
    return get_scheduler(name, optimizer, num_warmup_steps=min(warmup_steps, max(total_steps // 10, 1)),
                         num_training_steps=total_steps, scheduler_specific_kwargs=schedule_kwargs or None)


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
