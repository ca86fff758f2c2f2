"""Where a run's training time goes, step by step: a callback that times every training step of a real run.

    python -m alignment +callbacks.step_times._target_=benchmarks.steps.StepTimes [+callbacks.step_times.path=F]

Each step's cycle runs from its `on_train_batch_start` to the next step's: the step itself (forward, backward,
clipping, optimiser, learning-rate schedule) up to `on_train_batch_end`, then what follows -- the other callbacks'
batch-end hooks, metrics sent to the logger, checkpoints, the end of an epoch and the start of the next, loading
and collating the next batch. What the run's `PhaseTimes` books apart meanwhile (validation loops, the alignment
curve; the bench's interleaved bare steps) is taken out of the cycle, as `time/training` leaves it out
(alignment.timing). Cycles are classed by what they held; the time from the start of `fit` to the first step and
from the end of the last step to the end of `fit` is booked apart. At the end of `fit` the classes are printed (unless
`show` is false) and the cycles written to `path` as JSON.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl

from alignment.timing import PhaseTimes

#: Classes of cycles, in the printed order; a cycle takes the first class that applies.
CLASSES = ("first", "checkpoint", "epoch", "logging", "ordinary")


@dataclass
class Cycle:
    step: int              # global step after the optimiser step
    real: int              # real tokens of the batch (attention mask)
    padded: int            # tokens the step computed on (batch x longest)
    logging: bool          # metrics went to the logger in this cycle
    in_step: float = 0.0   # seconds from batch start to batch end
    seconds: float = 0.0   # the whole cycle, net of what PhaseTimes booked apart
    checkpoint: bool = False
    epoch: bool = False    # an epoch ended in this cycle (and the next one started)

    @property
    def kind(self) -> str:
        held = {"first": self.step == 1, "checkpoint": self.checkpoint, "epoch": self.epoch, "logging": self.logging}
        return next((name for name in CLASSES if held.get(name)), "ordinary")


class StepTimes(pl.Callback):
    """Times every training cycle. `setup` puts it first among the callbacks, so that its hooks open and close each
    cycle before the others run."""

    def __init__(self, path: str | None = None, show: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.path, self.show, self.clock = path, show, clock
        self.cycles: list[Cycle] = []
        self.before = self.after = 0.0  # fit start -> first step; last step's end -> fit end
        self.phases: PhaseTimes | None = None
        self._open: Cycle | None = None  # the cycle in progress
        self._start = self._booked = self._fit_start = self._train_end = 0.0

    def _booked_apart(self) -> float:
        """Seconds the run's PhaseTimes booked apart so far (validation, curve...), to subtract."""
        return sum(self.phases.seconds.values()) if self.phases is not None else 0.0

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)
        self.phases = next((c for c in trainer.callbacks if isinstance(c, PhaseTimes)), None)
        self._fit_start, self._booked = self.clock(), self._booked_apart()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = self.clock()
        if self._open is None:
            self.before = now - self._fit_start - (self._booked_apart() - self._booked)
        else:
            self._close(now)
        mask = batch["attention_mask"]
        self._open = Cycle(step=0, real=int(mask.sum()), padded=mask.numel(),
                           logging=trainer._logger_connector.should_update_logs)
        self._start, self._booked = now, self._booked_apart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._open.in_step = self.clock() - self._start
        self._open.step = trainer.global_step
        self._open.logging |= trainer._logger_connector.should_update_logs

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._open is not None:
            self._open.checkpoint = True

    def on_train_epoch_end(self, trainer, pl_module):
        if self._open is not None:
            self._open.epoch = True

    def on_train_end(self, trainer, pl_module):
        if self._open is not None:
            self._close(self.clock())
            self._open = None
        self._train_end, self._booked = self.clock(), self._booked_apart()

    def teardown(self, trainer, pl_module, stage):
        if stage != "fit" or not self.cycles:
            return
        self.after = self.clock() - self._train_end - (self._booked_apart() - self._booked)
        if self.show:
            print("\n" + self.summary())
        if self.path:
            Path(self.path).write_text(json.dumps({"cycles": [asdict(c) for c in self.cycles],
                                                   "before": self.before, "after": self.after}))

    def _close(self, now: float) -> None:
        self._open.seconds = now - self._start - (self._booked_apart() - self._booked)
        self.cycles.append(self._open)

    def classes(self) -> dict[str, dict[str, float]]:
        """Per class of cycles: how many, their seconds, the mean cycle and the mean step inside it (ms), and the
        share of all cycles' seconds."""
        total = sum(c.seconds for c in self.cycles) or 1.0
        out = {}
        for name in CLASSES:
            members = [c for c in self.cycles if c.kind == name]
            if members:
                seconds = sum(c.seconds for c in members)
                out[name] = {"cycles": len(members), "seconds": seconds, "share": seconds / total,
                             "cycle_ms": 1e3 * seconds / len(members),
                             "step_ms": 1e3 * sum(c.in_step for c in members) / len(members)}
        return out

    def summary(self) -> str:
        lines = ["Training cycles by kind (wall time, validation and curve taken out):",
                 "| kind | cycles | seconds | share | ms per cycle | of which the step |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {c['cycles']} | {c['seconds']:.2f} | {c['share']:.1%} | {c['cycle_ms']:.1f} "
                  f"| {c['step_ms']:.1f} |" for name, c in self.classes().items()]
        real, padded = sum(c.real for c in self.cycles), sum(c.padded for c in self.cycles)
        seconds = sum(c.seconds for c in self.cycles)
        in_steps = sum(c.in_step for c in self.cycles)
        lines.append(f"{len(self.cycles)} cycles in {seconds:.1f} s ({in_steps / seconds:.1%} of it inside the steps): "
                     f"{real / seconds:.0f} real tok/s, {padded / seconds:.0f} padded tok/s (padding "
                     f"{1 - real / padded:.1%}); before the first step {self.before:.1f} s, after the last "
                     f"{self.after:.1f} s")
        return "\n".join(lines)
