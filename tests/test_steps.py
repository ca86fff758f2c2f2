"""The per-step stopwatch of the bench (benchmarks.steps.StepTimes) on a real Trainer, with a scripted clock: a
training step takes 1 s, a validation loop 100 s and a checkpoint 10 s, so every cycle's figure is known."""
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from alignment.timing import PhaseTimes
from benchmarks.steps import StepTimes


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tiny(pl.LightningModule):
    """A linear layer; its hooks move the scripted clock as if the work took that long."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock, self.layer = clock, torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        return self.layer(batch["attention_mask"].float()).sum()

    def validation_step(self, batch, batch_idx):
        self.clock.now += 100.0

    def on_save_checkpoint(self, checkpoint):
        self.clock.now += 10.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_cycles_are_classed_and_net_of_validation(tmp_path):
    clock = Clock()
    # Batches of 2 rows: 3 real tokens of 4.
    batches = [{"attention_mask": torch.tensor([[1, 1], [1, 0]])}] * 3
    loader = DataLoader(batches, batch_size=None)
    step_times = StepTimes(clock=clock)
    trainer = pl.Trainer(max_steps=7, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                         log_every_n_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PhaseTimes(clock=clock), step_times,
                                    pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)])
    trainer.fit(Tiny(clock), train_dataloaders=loader, val_dataloaders=loader)

    cycles = step_times.cycles
    assert [c.step for c in cycles] == [1, 2, 3, 4, 5, 6, 7]
    # Epochs of 3 batches, each ended by a validation and a checkpoint, and so is the last step (the stop ends the
    # third epoch); metrics logged at steps 2, 4 and 6 (6 is classed by its checkpoint).
    assert [c.kind for c in cycles] == ["first", "logging", "checkpoint", "logging", "ordinary", "checkpoint",
                                        "checkpoint"]
    assert [c.step for c in cycles if c.epoch] == [3, 6, 7] and [c.step for c in cycles if c.logging] == [2, 4, 6]
    # Validation (100 s) taken out; a checkpoint's 10 s stays in its cycle.
    assert [c.seconds for c in cycles] == [1.0, 1.0, 11.0, 1.0, 1.0, 11.0, 11.0]
    assert [c.in_step for c in cycles] == [1.0] * 7
    assert (cycles[0].real, cycles[0].padded) == (3, 4)
    classes = step_times.classes()
    assert classes["checkpoint"] == {"cycles": 3, "seconds": 33.0, "share": pytest.approx(33 / 37),
                                     "cycle_ms": 11000.0, "step_ms": 1000.0}
    assert step_times.before == 0.0 and step_times.after == 0.0
    # 7 x 3 real tokens of 7 x 4 in 37 s.
    assert "7 cycles in 37.0 s (18.9% of it inside the steps): 1 real tok/s, 1 padded tok/s (padding 25.0%)" \
        in step_times.summary()
