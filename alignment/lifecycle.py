"""How a run ends, and how a stopped one goes on.

- Status: an MLflow run is FINISHED only when training, saving and evaluation all ended. Lightning's MLFlowLogger
  marks the run FINISHED when `fit` returns, before the evaluation; `RunLogger` leaves the status to `run_status`,
  which ends the run FINISHED, FAILED (an exception; its reason in the tag `failure`) or KILLED (SIGTERM, Ctrl-C).
  A SIGKILL leaves it RUNNING: nothing can run then; resuming ends it FINISHED.
- Non-finite loss: `Guard` stops training at the first NaN/inf loss, before the backward pass, naming the step;
  the checkpoints saved before stay the last good ones.
- Preemption: on SIGTERM during training (SLURM sends it before the time limit, and on preemption) Lightning ends
  the step in progress and raises SIGTERMException; `Guard` then saves `checkpoints/last.ckpt`, so the requeued job
  resumes from that step (`alignment.resume`).
- Resume: each training batch draws its dropout masks (and whatever else the step draws from torch) from a
  generator seeded by (seed, rank, batch number), not from where the global stream happens to be: that stream
  also feeds each DataLoader iterator's base seed, so a resumed run (a new train iterator; no validation at the
  step it was saved before) would be off by a draw or two and draw other masks from its first step on. NumPy's and
  Python's states go into the checkpoint (`Guard.state_dict`).
"""
from __future__ import annotations

import logging
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
#: The run folder's checkpoints (conf/callbacks/default.yaml writes there too) and the one a stopped run goes on from.
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
#: MLflow tag holding why a run FAILED or was KILLED.
FAILURE_TAG = "failure"


class NonFiniteLossError(RuntimeError):
    pass


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that while `run_status` holds the run, Lightning's own `finalize` calls (at
    the end of `fit`, on an exception) leave the status alone; and a resumed run drops the metric points it already
    has (`skip_logged`), so no step is logged twice."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = False
        self.logged: dict[str, int] = {}  # metric -> the last step the run already has (a resumed run)

    def finalize(self, status: str = "success") -> None:
        if not self.held:
            super().finalize(status)

    def log_metrics(self, metrics, step=None) -> None:
        if step is not None:  # each metric's steps only go up: a point the run has is not logged again
            metrics = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
            self.logged.update(dict.fromkeys(metrics, step))
        if metrics:
            super().log_metrics(metrics, step)

    def skip_logged(self) -> None:
        """Remember the last step of each metric the run has, so a resumed run logs only what is new."""
        client, run_id = self.experiment, self.run_id
        self.logged = {key: max(m.step for m in client.get_metric_history(run_id, key))
                       for key in client.get_run(run_id).data.metrics}


@contextmanager
def run_status(logger: RunLogger, guard: Guard, active: bool = True):
    """Own the MLflow status of `logger`'s run for the `with` block: RUNNING during, then FINISHED, FAILED or KILLED.
    A SIGTERM outside training (Lightning handles it during `fit`, see Guard) stops the run as KILLED instead of
    killing the process with the run left RUNNING. `active`: global rank 0 (the other DDP ranks have no run)."""
    if not active:
        yield
        return
    client, run_id = logger.experiment, logger.run_id
    logger.held = True
    client.update_run(run_id, status="RUNNING")  # a resumed run was FAILED, KILLED or left RUNNING

    def on_sigterm(signum, frame):
        if not guard.fitting:  # during fit Lightning calls this too, after it asked the loop to stop at the step's end
            raise SystemExit(128 + signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as stop:
        # Lightning turns a Ctrl-C during fit into sys.exit(1): Guard saw what it was.
        sigterm = isinstance(stop, SIGTERMException) or getattr(stop, "code", None) == 128 + signal.SIGTERM
        reason = "SIGTERM" if sigterm else guard.stopped_by or type(stop).__name__
        _end(client, run_id, "KILLED", f"stopped by {reason}")
        if sigterm and stop.code is None:  # Lightning's SIGTERMException carries no code: the process would exit 0
            raise SystemExit(128 + signal.SIGTERM) from stop
        raise
    except BaseException as error:
        _end(client, run_id, "FAILED", f"{type(error).__name__}: {error}")
        raise
    else:
        _end(client, run_id, "FINISHED")
    finally:
        logger.held = False
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _end(client, run_id: str, status: str, reason: str | None = None) -> None:
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])  # MLflow's limit on a tag value
    elif FAILURE_TAG in client.get_run(run_id).data.tags:  # a resumed run that now finished
        client.delete_tag(run_id, FAILURE_TAG)
    client.set_terminated(run_id, status)


class Guard(pl.Callback):
    """Stops at a non-finite loss, saves a checkpoint on SIGTERM, seeds torch per training batch and keeps NumPy's
    and Python's RNG states in every checkpoint."""

    def __init__(self, output_dir: Path, seed: int = 0):
        self.last = Path(output_dir) / CHECKPOINT_DIR / LAST
        self.seed = seed
        self.fitting = False
        self.stopped_by: str | None = None  # the exception that interrupted fit, by name
        self.rng: dict | None = None  # RNG states read from the checkpoint, until training starts

    def setup(self, trainer, pl_module, stage):
        self.fitting = stage == "fit"

    def teardown(self, trainer, pl_module, stage):
        self.fitting = False

    def on_before_backward(self, trainer, pl_module, loss):
        if not torch.isfinite(loss).all():
            good = sorted(self.last.parent.glob("*.ckpt")) if self.last.parent.is_dir() else []
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                "training stopped before this step changed the weights. "
                + (f"Last good checkpoints: {[str(p) for p in good]}. " if good else "No checkpoint was saved yet. ")
                + "Lower module.optimizer.lr or keep trainer.gradient_clip_val on.")

    def on_exception(self, trainer, pl_module, exception):
        self.stopped_by = type(exception).__name__
        # SIGTERMException is raised between steps: the state is whole, the step in progress finished.
        if isinstance(exception, SIGTERMException):
            self.last.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.last)
            log.warning("SIGTERM at step %d: saved %s; re-run with resume=%s to go on", trainer.global_step,
                        self.last, self.last.parent.parent)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # total_batch_idx counts the batches of the whole fit (a checkpoint restores it): a batch's masks are the
        # same whether the run went through or was resumed, and differ between the batches accumulated into one
        # step and between DDP ranks.
        torch.manual_seed(batch_seed(self.seed, trainer.global_rank, trainer.fit_loop.total_batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning logs a step's metrics after the callbacks, so after ModelCheckpoint saved that step: a kill in
        # between would lose them, and the resumed run starts after that step. Logged now (before the checkpoint,
        # which Lightning runs last), the later call finds them logged (RunLogger drops the repeat).
        connector = trainer._logger_connector
        if isinstance(trainer.logger, RunLogger) and connector.should_update_logs:
            connector.update_train_step_metrics()

    def on_train_start(self, trainer, pl_module):
        # Resumed mid-epoch: the sampler's order of this epoch is the same (seed, epoch), so leaving out the batches
        # already trained continues it (Lightning restarts a plain DataLoader from its first batch).
        # `processed` counts the batches whose step ran: a checkpoint saved in on_train_batch_end (ModelCheckpoint's)
        # has not counted its batch `completed` yet; Lightning fixes that after this hook. Saved after the epoch's
        # last batch, Lightning counts the restart mid-epoch too, but goes on with the next epoch: nothing to skip.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        mid_epoch = trainer.fit_loop.restarted_mid_epoch and 0 < done < trainer.num_training_batches
        if mid_epoch and hasattr(sampler, "skip"):
            sampler.skip = done
        if self.rng is not None:
            self._restore_rng()

    def state_dict(self) -> dict:
        # Plain types only, so that the checkpoint loads with torch.load(weights_only=True). Torch's state is not
        # needed: every batch seeds it (on_train_batch_start).
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
                "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng = state  # restored in on_train_start, after the sanity check

    def _restore_rng(self) -> None:
        state, self.rng = self.rng, None
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state["python"])


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """The torch seed of training batch `batch` (counted over the whole fit) on DDP rank `rank` of a run seeded
    `seed`: SeedSequence mixes the three, so nearby batches get unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, batch]).generate_state(1, np.uint64)[0])
