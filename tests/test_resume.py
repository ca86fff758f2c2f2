"""Run folders and `resume=`: each run gets a folder of its own even when started in the same second as another,
and a bad `resume=` value stops the run at once, naming the option, the value and what to pass."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from alignment import CONF_DIR, PROJECT_ROOT
from alignment.resume import problems
from alignment.train import run
from alignment.validation import ConfigError, validate

WHAT = "pass the folder of a stopped run (runs/single/<date>/<time>_<run name>, the one holding mlflow_run_id) or " \
       "its MLflow run id"


def composed(*overrides: str, count: int = 1) -> list:
    """`count` configs as `python -m alignment <overrides>` composes them, hydra node included. Their folders
    (hydra.run.dir, hydra.sweep.dir) take the time when first read, as in a run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return [compose("config", overrides=list(overrides), return_hydra_config=True) for _ in range(count)]


def test_two_runs_started_in_the_same_second_get_their_own_folders(runs_dir, tmp_path):
    for _ in range(5):  # read back to back, the two times share their second unless it just turned
        a, b = composed(count=2)
        run_a, run_b, sweep_a, sweep_b = a.hydra.run.dir, b.hydra.run.dir, a.hydra.sweep.dir, b.hydra.sweep.dir
        if run_a.split("/")[-1][:8] == run_b.split("/")[-1][:8]:  # HH-MM-SS
            break
    else:
        pytest.fail("no two configs read in the same second")
    assert run_a != run_b and sweep_a != sweep_b
    for run_dir, sweep_dir in ((run_a, sweep_a), (run_b, sweep_b)):
        assert run_dir.startswith(f"{runs_dir}/single/") and run_dir.endswith("_toxsen-conditional")
        assert sweep_dir.startswith(f"{runs_dir}/multi/")
        assert a.hydra.run.dir == run_a  # read again, the same folder (Hydra reads it more than once)
    # resume= still finds the run's own folder (a run folder is one holding mlflow_run_id)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "mlflow_run_id").write_text("0" * 32)
    assert composed(f"resume={stopped}")[0].hydra.run.dir == str(stopped)


def bad_resume(tiny_config, tmp_path, value: str, expected: str) -> None:
    """`resume=value` stops the run before anything is written, with `expected` as its one problem."""
    store = tmp_path / "mlflow.db"
    cfg = tiny_config(f"resume={value}", f"logger.tracking_uri=sqlite:///{store}", f"paths.cache_dir={tmp_path}/c")
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert error.value.problems == [expected]
    assert not (tmp_path / "c").exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_resume_from_a_folder_that_does_not_exist(tiny_config, tmp_path):
    bad_resume(tiny_config, tmp_path, "/no/such/run",
               f"resume=/no/such/run: no such folder (working directory {os.getcwd()}) and not an MLflow run id; "
               + WHAT)
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_from_a_folder_that_is_not_a_run(tiny_config, tmp_path):
    bad_resume(tiny_config, tmp_path, str(tmp_path),
               f"resume={tmp_path}: not a run folder (it has no mlflow_run_id); " + WHAT)


def test_resume_from_a_run_folder_without_a_readable_checkpoint(tiny_config, tmp_path):
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "mlflow_run_id").write_text("0" * 32)
    (stopped / "checkpoints" / "last.ckpt").write_bytes(b"torn")
    expected = (f"resume={stopped}: {stopped}/checkpoints holds no readable checkpoint, nothing to go on from (the "
                "run stopped before its first one, or ran without callbacks=default); run the command without "
                "resume= to start anew")
    bad_resume(tiny_config, tmp_path, str(stopped), expected)
    torch.save({"global_step": 3}, stopped / "checkpoints" / "step3.ckpt")  # now there is one: accepted
    assert problems(str(stopped), "sqlite:////unused.db") == []


def test_resume_from_an_unknown_mlflow_run_id(tiny_config, tmp_path):
    unknown = "0123456789abcdef0123456789abcdef"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bad_resume(tiny_config, tmp_path, unknown,
               f"resume={unknown}: no MLflow run with this id in {store} (no store there yet); " + WHAT)
    assert not (tmp_path / "mlflow.db").exists()  # asking did not create the store

    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("alignment", artifact_location=str(tmp_path / "artifacts"))
    bad_resume(tiny_config, tmp_path, unknown,
               f"resume={unknown}: no MLflow run with this id in {store} (Run with id={unknown} not found); " + WHAT)
    assert client.search_runs([experiment]) == []  # no run left behind


def test_resume_in_a_sweep_is_refused(tiny_config, tmp_path):
    # Each job of a sweep has a folder of its own: one resume= cannot name them all.
    cfg = tiny_config(f"resume={tmp_path}")
    hydra_node = HydraConfig.instance().cfg.hydra
    with read_write(hydra_node):
        hydra_node.mode = RunMode.MULTIRUN
    with pytest.raises(ConfigError) as error:
        validate(cfg, check_server=False)
    assert error.value.problems == [f"resume={tmp_path}: resumes one run, not a sweep (-m): run the stopped job's "
                                    "command alone with it (a job SLURM requeued resumes by itself)"]


def test_the_command_line_names_a_bad_resume_without_a_traceback(tmp_path):
    env = dict(os.environ, ALIGNMENT_RUNS_DIR=str(tmp_path), PYTHONPATH=str(PROJECT_ROOT))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "alignment", "resume=no/such/run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[:2] == [
        "Error: Invalid configuration, nothing was run:",
        f"  resume=no/such/run: no such folder (working directory {tmp_path}) and not an MLflow run id; " + WHAT]
    assert "Traceback" not in done.stderr and not (tmp_path / "mlflow.db").exists()
    assert not any((tmp_path / "single").iterdir())  # the new folder Hydra made for it is gone


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path):
    # A stopped run's folder, as train.py and Hydra left it; the resuming command has a typo.
    stopped = tmp_path / "runs" / "single" / "2026-01-02" / "03-04-05-000006_tox-conditional"
    (stopped / ".hydra").mkdir(parents=True)
    (stopped / "checkpoints").mkdir()
    torch.save({"global_step": 3}, stopped / "checkpoints" / "last.ckpt")
    (stopped / "mlflow_run_id").write_text("0" * 32)
    (stopped / "alignment.log").write_text("[2026-01-02 03:04:05][alignment.train][INFO] - the stopped run\n")
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (stopped / ".hydra" / name).write_text(f"the stopped run's {name}\n")
    before = files(stopped)
    env = dict(os.environ, ALIGNMENT_RUNS_DIR=str(tmp_path / "runs"), PYTHONPATH=str(PROJECT_ROOT))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "alignment", f"resume={stopped}", "eval.mode=promptd"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["Error: Invalid configuration, nothing was run:",
                                        "  eval.mode='promptd': must be one of unconditional, prompted"]
    # Hydra wrote this command's config copies to .hydra/<time> (not over the run's own), then they went again.
    assert files(stopped) == before and sorted(p.name for p in (stopped / ".hydra").iterdir()) == sorted(
        ["config.yaml", "hydra.yaml", "overrides.yaml"])
    assert [p.name for p in (tmp_path / "runs" / "single").iterdir()] == ["2026-01-02"]
