"""`python -m alignment <same overrides> resume=<run folder | MLflow run id>`: go on from the run's last checkpoint,
in the same folder and the same MLflow run.

The folder is chosen before Hydra starts the job (the resolver `resume_dir` in conf/hydra/default.yaml), so the
log, the checkpoints and the outputs stay together. Lightning restores the weights, optimizer, scheduler, step and
loop counters from the checkpoint; `lifecycle.Guard` seeds each batch's random draws from its number (so dropout
goes on as if never stopped) and skips the batches of the epoch that were already trained (the sampler's order is
a function of seed and epoch); the resumed MLflow run drops the metric points it already has. Resuming is
explicit, except after a SLURM requeue: a new command gets a new, timestamped folder, so "the same command's
previous folder" has no clean definition, while a requeued job runs again in its own folder
(SLURM_RESTART_COUNT > 0) and goes on from there.

Lightning writes checkpoints atomically (fsspec's local transaction: a temporary file, then a rename), so a kill
leaves the previous file whole; a file torn anyway (a copy cut short, a full disk) is detected on load and the
newest readable checkpoint used instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.lifecycle import CHECKPOINT_DIR, LAST
from alignment.validation import store_exists

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"


#: What `resume=` takes, said with each error about it.
WHAT_TO_PASS = ("pass the folder of a stopped run (runs/single/<date>/<time>_<run name>, the one holding "
                f"{RUN_ID_FILE}) or its MLflow run id")


def _looks_like_run_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def run_folder(resume: str, tracking_uri: str) -> Path:
    """The folder of `resume`: a run folder as given, or the `output_dir` tag of an MLflow run id. A bad value
    raises ValueError naming the option, the value and what to pass."""
    path = Path(resume).expanduser()
    if path.is_dir() or not _looks_like_run_id(resume):
        if not path.is_dir():
            raise ValueError(f"resume={resume}: no such folder (working directory {os.getcwd()}) and not an MLflow "
                             f"run id; {WHAT_TO_PASS}")
        if not (path / RUN_ID_FILE).is_file():
            raise ValueError(f"resume={resume}: not a run folder (it has no {RUN_ID_FILE}); {WHAT_TO_PASS}")
        return path.resolve()
    if not store_exists(tracking_uri):  # asking MLflow would create an empty store
        raise ValueError(f"resume={resume}: no MLflow run with this id in {tracking_uri} (no store there yet); "
                         f"{WHAT_TO_PASS}")
    import mlflow

    try:
        tags = mlflow.MlflowClient(tracking_uri).get_run(resume).data.tags
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"resume={resume}: no MLflow run with this id in {tracking_uri} ({error}); "
                         f"{WHAT_TO_PASS}") from error
    if "output_dir" not in tags or not Path(tags["output_dir"]).is_dir():
        raise ValueError(f"resume={resume}: the run's folder {tags.get('output_dir')} is not on this machine; "
                         "pass that folder, copied here, instead of the run id")
    return Path(tags["output_dir"])


def problems(resume, tracking_uri) -> list[str]:
    """What is wrong with `resume=` (alignment.validation): the folder or run id must exist and hold a readable
    checkpoint: resuming a run stopped before its first one would restart it and log steps it already has."""
    if resume in (None, "", "null"):
        return []
    try:
        folder = run_folder(str(resume), str(tracking_uri))
    except ValueError as error:
        return [str(error)]
    if last_good_checkpoint(folder / CHECKPOINT_DIR) is None:
        return [f"resume={resume}: {folder / CHECKPOINT_DIR} holds no readable checkpoint, nothing to go on from "
                "(the run stopped before its first one, or ran without callbacks=default); run the command "
                "without resume= to start anew"]
    return []


def resume_dir(resume, tracking_uri, default):
    """OmegaConf resolver for hydra.run.dir: the resumed run's folder, or `default` for a new run. A bad value
    gets `default` too: `validate` then stops the run with the reason, as for any other bad option (an error
    raised here would come out of Hydra with a traceback)."""
    if resume in (None, "", "null"):
        return default
    try:
        return str(run_folder(str(resume), str(tracking_uri)))
    except ValueError:
        return default


def hydra_subdir(output_dir, stamp) -> str:
    """OmegaConf resolver for hydra.output_subdir, where Hydra writes its copies of the command's config: `.hydra`
    in a new folder; in a folder that already holds a run (resume=, a requeued job) `.hydra/<stamp>`, so the
    run's own record stays as it was, and a refused command's copies can go without touching it."""
    if output_dir is not None and (Path(output_dir) / RUN_ID_FILE).is_file():
        return f".hydra/{stamp}"
    return ".hydra"


@dataclass
class Resumed:
    folder: Path
    run_id: str
    checkpoint: Path | None  # None: the run was stopped before its first checkpoint (training starts over)


def locate(resume: str | None, output_dir: Path) -> Resumed | None:
    """What to resume in `output_dir` (already the resumed folder, see resume_dir), or None for a new run.
    A job SLURM requeued (SLURM_RESTART_COUNT > 0) re-runs in its own folder: it resumes without being asked."""
    requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
    if resume in (None, "") and not (requeued and (output_dir / RUN_ID_FILE).is_file()):
        return None
    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    return Resumed(output_dir, run_id, last_good_checkpoint(output_dir / CHECKPOINT_DIR))


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint of `folder` that loads (`last.ckpt` first among equals), or None. Lightning's own
    SLURM checkpoint (hpc_ckpt_<n>.ckpt, saved on SIGUSR1 before a requeue) in the run folder counts too."""
    candidates = [*folder.glob("*.ckpt"), *folder.parent.glob("hpc_ckpt_*.ckpt")]
    candidates.sort(key=lambda p: (p.stat().st_mtime, p.name == LAST), reverse=True)
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as error:  # a torn zip archive raises RuntimeError, a truncated one EOFError or others
            log.warning("Checkpoint %s is unreadable (%s): trying the previous one", path, error)
    return None
