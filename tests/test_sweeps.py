"""Hydra multiruns tracked in MLflow: one parent run per sweep, one child run per job, against the
default sqlite store and against a real `mlflow server` (artifacts uploaded through the server)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment import CONF_DIR
from alignment.tracking import PARENT_FILE, artifact_location_for, command_line_overrides, job_command_line
from tests.conftest import SUBMITIT_MISSING, TINY
from tests.test_distributed import run_alignment

SWEEP = ["-m", "task=tox,none", *TINY]


def test_job_command_line_keeps_config_flags_and_replaces_the_sweep():
    sweep_args = ["-m", "-cn", "config", "--config-dir=/extra", "task=tox,none", "model=tiny"]
    assert job_command_line(sweep_args, ["task=none", "model=tiny"]) == \
        ["-cn", "config", "--config-dir=/extra", "task=none", "model=tiny"]
    assert job_command_line(["--multirun", "objective=awr,rwr"], ["objective=rwr"]) == ["objective=rwr"]


def test_overrides_are_read_as_typed():
    overrides = OmegaConf.create(["task=tox", "x=${hydra:runtime.output_dir}/probe"])
    assert command_line_overrides(overrides) == ["task=tox", "x=${hydra:runtime.output_dir}/probe"]


def test_artifacts_go_to_the_local_folder_only_for_local_stores():
    assert artifact_location_for("sqlite:////runs/mlflow.db", "/runs/mlartifacts") == "/runs/mlartifacts"
    assert artifact_location_for("file:///runs/mlruns", "/runs/mlartifacts") == "/runs/mlartifacts"
    assert artifact_location_for("http://127.0.0.1:5000", "/runs/mlartifacts") is None
    assert artifact_location_for("https://mlflow.example.org", "/runs/mlartifacts") is None


def test_sweep_parent_run_follows_the_jobs_store(runs_dir):  # runs_dir: paths resolve under a tmp folder
    """`logger.tracking_uri=...` moves the sweep's parent run too (else it would land in another store
    than its children), and a server gets no local artifact folder."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger.tracking_uri=http://tracking:5000"], return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.mlflow_sweep)
    assert (callback.tracking_uri, callback.artifact_location) == ("http://tracking:5000", None)


@pytest.mark.slow
def test_a_failing_job_fails_the_sweep_and_its_own_run(tmp_path, runs_dir):
    """Job 0 trains; job 1 asks for an unknown learning-rate schedule, which the validation refuses before the
    job creates its MLflow run. Hydra stops the sweep there without calling on_multirun_end: the parent must not stay
    RUNNING."""
    runs = tmp_path / "runs"
    output = run_alignment(["-m", "module.scheduler.name=cosine_with_min_lr,exponential", "task=tox", *TINY,
                            "save_model=false",
                            f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=240, succeed=False)
    assert "module.scheduler.name='exponential': must be one of linear, cosine, cosine_with_restarts" in output
    (sweep_dir,) = (runs / "multi").glob("*/*")
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    mlruns = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    (parent,) = [r for r in mlruns if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_id == (sweep_dir / PARENT_FILE).read_text()
    assert parent.info.status == "FAILED" and parent.info.end_time is not None
    assert parent.data.tags["sweep.overrides"].startswith(
        "module.scheduler.name=cosine_with_min_lr,exponential task=tox")
    jobs = {r.data.tags["sweep.job"]: r for r in mlruns if r is not parent}
    assert sorted(jobs) == ["0"]  # job 1 left no run behind
    assert jobs["0"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert jobs["0"].info.status == "FINISHED" and "eval/none/joint/misaligned" in jobs["0"].data.metrics


def check_sweep(runs: Path, tracking_uri: str) -> tuple[Path, mlflow.entities.Run, dict]:
    """The sweep left one folder with a job folder each, a FINISHED parent run and two FINISHED children
    tagged with its id, named as the jobs. Returns the sweep folder, the parent and the children by name."""
    (sweep_dir,) = (runs / "multi").glob("*/*")
    folders = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == ["0_tox-conditional", "1_none-conditional", "report"]  # report: the sweep's comparison
    assert (sweep_dir / "0_tox-conditional" / "alignment.log").exists()  # named after the app, not __main__
    assert not (runs / "single").exists()

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("alignment")
    mlruns = client.search_runs([experiment.experiment_id])
    parents = [r for r in mlruns if "mlflow.parentRunId" not in r.data.tags]
    assert len(mlruns) == 3 and len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == (sweep_dir / PARENT_FILE).read_text()
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert parent.data.tags["sweep.overrides"].startswith("task=tox,none model=tiny")

    children = {r.info.run_name: r for r in mlruns if r is not parent}
    assert sorted(children) == ["none-conditional", "tox-conditional"]
    for job, name in (("0", "tox-conditional"), ("1", "none-conditional")):
        child = children[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sweep.job"] == job and child.info.status == "FINISHED"
        assert (sweep_dir / f"{job}_{name}" / "mlflow_run_id").read_text() == child.info.run_id
        assert "val/loss" in child.data.metrics and child.data.params["task/name"] == name.split("-")[0]
    return sweep_dir, parent, children


@pytest.mark.slow
def test_sweep_with_the_default_sqlite_store(tmp_path, runs_dir):
    runs = tmp_path / "runs"
    output = run_alignment([*SWEEP, f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=240)
    _, parent, children = check_sweep(runs, f"sqlite:///{runs}/mlflow.db")
    # Each job and the sweep print where the MLflow UI shows them (`make ui` serves the store on port 5000).
    experiment = f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}"
    for run in (parent, *children.values()):
        assert f"this run:   {experiment}/runs/{run.info.run_id}\n" in output
    compare = next(line for line in output.splitlines() if line.startswith("  compare:    "))
    assert all(child.info.run_id in compare for child in children.values())
    for child in children.values():  # artifacts in the project's local folder
        assert Path(child.info.artifact_uri) == runs / "mlartifacts" / child.info.run_id / "artifacts"
        assert (Path(child.info.artifact_uri) / "config.yaml").exists()
        assert (Path(child.info.artifact_uri) / "model" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(SUBMITIT_MISSING, reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
def test_sweep_through_submitit(tmp_path, runs_dir):
    """The cluster launcher for real, on submitit's local executor (what hydra/launcher=slurm does on SLURM, minus
    sbatch): each job runs in a process of its own that submitit starts, and finds the sweep's parent run."""
    runs = tmp_path / "runs"
    run_alignment([*SWEEP, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                   f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=300)
    sweep_dir, _, children = check_sweep(runs, f"sqlite:///{runs}/mlflow.db")
    submitted = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(submitted) == 2  # one submitit job each, with its own log
    for child in children.values():
        assert (Path(child.info.artifact_uri) / "model" / "generation_config.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server on 127.0.0.1: sqlite backend and proxied artifacts in tmp_path.
    Yields (url, artifacts folder); stopped (its whole process group) afterwards."""
    port, artifacts, log_path = free_port(), tmp_path / "server_artifacts", tmp_path / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(artifacts)]
    # No background job runner: it starts seven more processes that this test does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_health(url, server, log_path, timeout=120)
            yield url, artifacts
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # `mlflow server` and the uvicorn process it started
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def wait_for_health(url: str, server: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return
        except OSError:
            pass
        assert server.poll() is None, f"mlflow server exited:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"mlflow server did not answer /health within {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_sweep_against_an_mlflow_server(tmp_path, runs_dir, mlflow_server):
    url, server_artifacts = mlflow_server
    runs = tmp_path / "runs"
    run_alignment([*SWEEP, f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=240, tracking_uri=url)
    sweep_dir, _, children = check_sweep(runs, url)

    # Nothing tracked locally: the runs and their artifacts are on the server.
    assert not (runs / "mlflow.db").exists() and not (runs / "mlartifacts").exists()
    client = mlflow.MlflowClient(url)
    assert client.get_experiment_by_name("alignment").artifact_location.startswith("mlflow-artifacts:")
    for name, child in children.items():
        run_id = child.info.run_id
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"config.yaml", "dataset.json", "model", "eval"} <= {a.path for a in client.list_artifacts(run_id)}
        assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}
        # Uploaded through the server into its --artifacts-destination, and served back intact.
        stored = list(server_artifacts.glob(f"*/{run_id}/artifacts/model/model.safetensors"))
        assert len(stored) == 1
        job_dir = next(sweep_dir.glob(f"*_{name}"))
        downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                         dst_path=str(tmp_path / name), tracking_uri=url)
        assert Path(downloaded).read_text() == (job_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_a_nan_loss_in_one_job_leaves_the_other_jobs_to_finish(tmp_path, runs_dir):
    """Job 0's learning rate (1e30, as in test_lifecycle) makes its loss NaN at step 2; job 1 trains normally.
    Hydra's basic launcher runs every job of the sweep, each catching its own error, and reports a failure only
    after the last: job 1 finishes, job 0 is FAILED with the reason, the sweep exits non-zero (parent FAILED)."""
    runs = tmp_path / "runs"
    output = run_alignment(["-m", "module.optimizer.lr=1e30,1e-3", "task=tox", *TINY, "save_model=false",
                            "evaluate=false", f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=1200,
                           succeed=False)
    assert "NonFiniteLossError: the training loss is nan at step 2" in output, output[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    mlruns = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    (parent,) = [r for r in mlruns if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    jobs = {r.data.tags["sweep.job"]: r for r in mlruns if r is not parent}
    assert sorted(jobs) == ["0", "1"]
    assert jobs["0"].info.status == "FAILED"
    assert jobs["0"].data.tags["failure"].startswith("NonFiniteLossError: the training loss is nan at step 2")
    assert jobs["1"].info.status == "FINISHED" and "val/loss" in jobs["1"].data.metrics
    steps = [m.step for m in client.get_metric_history(jobs["1"].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(6))  # job 1 trained all its steps
