"""How runs end and go on: FINISHED only at the very end, FAILED/KILLED with the reason, a NaN loss stopped at its
step, SIGTERM saving a checkpoint, and a run killed with SIGKILL resumed into the same folder and MLflow run with
the weights an uninterrupted run reaches."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from alignment import PROJECT_ROOT
from alignment.lifecycle import NonFiniteLossError
from alignment.resume import last_good_checkpoint
from alignment.train import run
from tests.conftest import TINY, compose_config

# Checkpoints after every step (Lightning's ModelCheckpoint as conf/callbacks/default.yaml sets it up).
EVERY_STEP = ["callbacks=default", "callbacks.checkpoint.monitor=null", "+callbacks.checkpoint.every_n_train_steps=1",
              "callbacks.checkpoint.save_top_k=-1", "~callbacks.lr_monitor"]


def test_a_non_finite_loss_stops_the_run_at_its_step_and_keeps_the_good_checkpoints(tiny_config, tmp_path):
    # lr 1e30 (a 6-step run warms up in one step: step 0 at lr 0, step 1 at the full rate): step 1 is finite and
    # throws the weights to ~1e30, so the loss of step 2 is NaN; checkpoints were saved after steps 1 and 2
    # (global_step counts done steps).
    cfg = tiny_config("module.optimizer.lr=1e30", *EVERY_STEP)
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at step 2 \(epoch 0\); training stopped "
                                                 r"before this step changed the weights"):
        run(cfg)
    folder = tmp_path / "out"
    mlrun = mlflow.MlflowClient(cfg.logger.tracking_uri).get_run((folder / "mlflow_run_id").read_text().strip())
    assert mlrun.info.status == "FAILED"
    assert mlrun.data.tags["failure"].startswith("NonFiniteLossError: the training loss is nan at step 2")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt"]
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_torn_last_checkpoint_falls_back_to_the_newest_readable_one(tmp_path):
    for name in ("step1.ckpt", "step2.ckpt", "last.ckpt"):
        torch.save({"step": name}, tmp_path / name)
        time.sleep(0.01)  # distinct modification times
    assert last_good_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # torn mid-write
    assert last_good_checkpoint(tmp_path) == tmp_path / "step2.ckpt"
    (tmp_path / "step2.ckpt").write_bytes(b"")
    assert last_good_checkpoint(tmp_path) == tmp_path / "step1.ckpt"


DROPOUT = ["+model.arch.resid_pdrop=0.1", "+model.arch.embd_pdrop=0.1", "+model.arch.attn_pdrop=0.1"]


def stopped_copy(folder: Path, step: int, to: Path) -> Path:
    """`folder` as a run stopped after the checkpoint of `step` left it: the later checkpoints left out (copytree
    keeps the files' times, by which resume picks the newest)."""
    later = {f"step{n}.ckpt" for n in range(step + 1, 1000)} | {"last.ckpt"}
    shutil.copytree(folder, to, ignore=lambda _, names: [n for n in names if n in later])
    return to


def test_a_run_resumed_from_any_checkpoint_reaches_the_uninterrupted_weights_with_dropout_on(tmp_path):
    # 3 epochs of 4 batches, validation every 3 steps (counted across epochs). Resumed from step 3 (saved before
    # that step's validation, which the resumed run does not repeat), 4 (the end of an epoch) and 6 (mid-epoch,
    # saved before a validation, in the second epoch): each run draws other random numbers before its next step (a
    # new train iterator draws its base seed from torch, the uninterrupted run's validation draws two), and the
    # epoch-end one starts the next epoch with its first batch.
    args = [*TINY, *EVERY_STEP, *DROPOUT, "trainer.max_epochs=3", "trainer.limit_train_batches=4",
            "trainer.max_steps=10", "evaluate=false", "save_model=false", "eval.curve.every_n_steps=0", "task=tox"]
    whole = tmp_path / "whole"
    run(compose_config(args, whole))
    final = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 10 and final["epoch"] == 2
    for step in (3, 4, 6):
        folder = stopped_copy(whole, step, tmp_path / f"stopped{step}")
        run(compose_config([*args, f"resume={folder}"], folder))
        resumed = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert resumed["global_step"] == 10
        for key, value in final["state_dict"].items():
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-6, atol=1e-7,
                                       msg=f"resumed from step {step}: {key}")


# A run long enough to be stopped in the middle: 24 steps of 8 sentences (one epoch of the 400-tweet slice is
# about 45 batches), checkpoints every step, dropout on, no evaluation, no alignment curve.
LONG = [*TINY, *EVERY_STEP, *DROPOUT, "trainer.max_steps=24", "trainer.val_check_interval=8", "evaluate=false",
        "eval.curve.every_n_steps=0", "task=tox"]


def start(args: list[str], runs: Path, **variables: str) -> subprocess.Popen:
    env = {**os.environ, "ALIGNMENT_RUNS_DIR": str(runs), "PYTHONPATH": str(PROJECT_ROOT), **variables}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "alignment", *args], cwd=PROJECT_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 1500) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"python -m alignment timed out:\n{output[-4000:]}")
    return proc.returncode, output


def stop_at(proc: subprocess.Popen, runs: Path, checkpoint: str, signum: int) -> Path:
    """Send `signum` once the run has written `checkpoint`; return the run folder."""
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((runs / "single").glob(f"*/*/checkpoints/{checkpoint}")) if (runs / "single").exists() else []
        if found:
            os.killpg(proc.pid, signum)
            return found[0].parent.parent
        time.sleep(0.2)
    pytest.fail(f"no {checkpoint} before the run ended:\n{finish(proc)[1][-4000:]}")


def the_run(runs: Path, folder: Path) -> mlflow.entities.Run:
    return mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db").get_run((folder / "mlflow_run_id").read_text().strip())


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, runs_dir):
    cache = f"paths.cache_dir={runs_dir / 'cache'}"
    code, output = finish(start([*LONG, cache], tmp_path / "whole"))
    assert code == 0, output[-4000:]
    (whole,) = (tmp_path / "whole" / "single").glob("*/*")

    runs = tmp_path / "split"
    proc = start([*LONG, cache], runs)
    folder = stop_at(proc, runs, "step11.ckpt", signal.SIGKILL)  # mid-epoch, past the validation at step 8
    finish(proc)
    assert the_run(runs, folder).info.status == "RUNNING"  # nothing could say otherwise
    run_id = (folder / "mlflow_run_id").read_text().strip()
    code, output = finish(start([*LONG, cache, f"resume={run_id}"], runs))  # by MLflow run id: the same folder
    assert code == 0, output[-4000:]
    assert sorted(p.name for p in (runs / "single").glob("*/*")) == [folder.name]

    mlrun = the_run(runs, folder)
    assert mlrun.info.status == "FINISHED" and "failure" not in mlrun.data.tags
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(24))  # each step once: none twice, none skipped (log_every_n_steps=1)
    reference = load_file(whole / "model" / "model.safetensors")
    resumed = load_file(folder / "model" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_ends_killed_and_the_resumed_run_finishes(tmp_path, runs_dir):
    runs, cache = tmp_path / "runs", f"paths.cache_dir={runs_dir / 'cache'}"
    proc = start([*LONG, cache], runs)
    folder = stop_at(proc, runs, "step5.ckpt", signal.SIGTERM)
    code, output = finish(proc)
    assert code != 0 and "SIGTERM at step" in output, output[-4000:]
    mlrun = the_run(runs, folder)
    assert mlrun.info.status == "KILLED" and mlrun.data.tags["failure"] == "stopped by SIGTERM"
    step = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= step < 24

    code, output = finish(start([*LONG, cache, f"resume={folder}"], runs))
    assert code == 0, output[-4000:]
    mlrun = the_run(runs, folder)
    assert mlrun.info.status == "FINISHED" and "failure" not in mlrun.data.tags
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 24


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 1500
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {path} before the run ended:\n{finish(proc)[1][-4000:]}")
        time.sleep(0.2)


#: What SLURM sets in a one-task job and Lightning reads (SLURMEnvironment: it detects SLURM by SLURM_NTASKS).
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "alignment", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
def test_a_job_slurm_requeued_resumes_by_itself_in_its_folder_and_mlflow_run(tmp_path, runs_dir):
    """A SLURM job as hydra/launcher=slurm runs it: a folder fixed before it starts (a sweep job's), SLURM's
    variables set. SIGUSR1 (SLURM's warning before the time limit) makes Lightning save hpc_ckpt_1.ckpt and call
    `scontrol requeue`, which this machine does not have; the job is then killed, as at the time limit. SLURM runs
    the same job again in the same folder with SLURM_RESTART_COUNT=1: without resume=, it goes on there from the
    newest checkpoint, in the same MLflow run. (SLURM itself, sbatch and submitit's requeue are not run here.)"""
    runs, job = tmp_path / "runs", tmp_path / "runs" / "job"
    args = [*LONG, f"paths.cache_dir={runs_dir / 'cache'}", f"hydra.run.dir={job}"]
    proc = start(args, runs, **SLURM_JOB)
    wait_for(job / "checkpoints" / "step5.ckpt", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(job / "checkpoints" / "step11.ckpt", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    output = finish(proc)[1]
    assert "Requeuing SLURM job 4242 failed with error code 127" in output, output[-4000:]  # no scontrol here
    assert (job / "hpc_ckpt_1.ckpt").is_file()
    run_id = (job / "mlflow_run_id").read_text().strip()
    assert the_run(runs, job).info.status == "RUNNING"

    code, output = finish(start(args, runs, **SLURM_JOB, SLURM_RESTART_COUNT="1"))
    assert code == 0, output[-4000:]
    assert f"Resuming MLflow run {run_id} in {job} from {job}/checkpoints/" in output
    assert not (runs / "single").exists()  # no new run folder
    mlrun = the_run(runs, job)
    assert mlrun.info.run_id == run_id and mlrun.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1  # no new MLflow run
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(24))  # each step once
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 24
    # The job's own record of its command stays; the requeued run's is beside it.
    (requeued,) = [p for p in (job / ".hydra").iterdir() if p.is_dir()]
    assert sorted(p.name for p in requeued.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


@pytest.mark.slow
def test_three_runs_at_once_share_one_sqlite_store(tmp_path, runs_dir):
    """Three runs of one command (seeds apart) started together against one sqlite store, as from three terminals
    or a job array without a server: each gets a folder of its own, ends FINISHED with every metric point, and no
    write failed on sqlite's lock. No store exists yet: the three create it, its tables and its experiment at once
    (tracking.open_store locks the store's creation; unlocked, MLflow's table migration raced)."""
    runs = tmp_path / "runs"
    args = [*TINY, "task=tox", "save_model=false", "evaluate=false", "eval.curve.every_n_steps=0",
            f"paths.cache_dir={runs_dir / 'cache'}"]
    procs = [start([*args, f"seed={seed}"], runs) for seed in (1, 2, 3)]
    for code, output in [finish(proc) for proc in procs]:
        assert code == 0, output[-4000:]
        assert "database is locked" not in output and "OperationalError" not in output, output[-4000:]
    folders = sorted((runs / "single").glob("*/*"))
    assert len(folders) == 3 and all(f.name.endswith("_tox-conditional") for f in folders)
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    seeds = []
    for folder in folders:
        assert "database is locked" not in (folder / "alignment.log").read_text()
        mlrun = the_run(runs, folder)
        assert mlrun.info.status == "FINISHED" and "val/loss" in mlrun.data.metrics
        steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(6))  # TINY: 6 steps, each logged (log_every_n_steps=1)
        seeds.append(mlrun.data.tags["seed"])
    assert sorted(seeds) == ["1", "2", "3"]
