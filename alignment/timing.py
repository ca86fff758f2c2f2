"""Where a run's minutes go: wall-clock seconds per phase (data, setup, training, validation, alignment curve,
saving, evaluation), logged to MLflow as `time/<phase>` and printed at the end of the run.

`run()` calls `phases.lap(name)` at the end of each of its phases; fitting is one lap for it, and this callback
splits it: the validation loops and the alignment curve (which runs inside training steps) are booked apart and
taken out of `training`, so `training` is what the optimiser steps cost, data loading, logging and checkpoints
included.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytorch_lightning as pl

#: Order of the printed line; phases never entered are left out.
PHASES = ("data", "setup", "training", "validation", "curve", "saving", "evaluation")


class PhaseTimes(pl.Callback):
    """A stopwatch with laps: `lap(name)` books the time since the previous lap (or since creation) under `name`,
    net of what the hooks booked meanwhile (validation loops, and the curve through `phase("curve")`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self._lap_start = clock()
        self._booked_since_lap = 0.0
        self._validation_start: float | None = None

    def _book(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        now = self.clock()
        self._book(name, now - self._lap_start - self._booked_since_lap)
        self._lap_start, self._booked_since_lap = now, 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Book the block under `name`, apart from the lap it runs in."""
        start = self.clock()
        try:
            yield
        finally:
            elapsed = self.clock() - start
            self._book(name, elapsed)
            self._booked_since_lap += elapsed

    # Validation loops (the sanity check included) run inside fit.
    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = self.clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_start is not None:
            elapsed = self.clock() - self._validation_start
            self._book("validation", elapsed)
            self._booked_since_lap += elapsed
            self._validation_start = None

    def metrics(self) -> dict[str, float]:
        """`time/<phase>` in seconds, and `time/total`."""
        ordered = {name: self.seconds[name] for name in PHASES if name in self.seconds}
        return {**{f"time/{name}": s for name, s in ordered.items()}, "time/total": sum(ordered.values())}

    def summary(self) -> str:
        """One line, e.g. `Time per phase: data 12 s (4%), training 250 s (83%), ...; total 301 s`."""
        total = sum(self.seconds.values())
        parts = [f"{name} {self.seconds[name]:.0f} s ({self.seconds[name] / (total or 1):.0%})"
                 for name in PHASES if name in self.seconds]
        return f"Time per phase: {', '.join(parts)}; total {total:.0f} s"
