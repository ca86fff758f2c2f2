"""Real multi-process DDP on CPU (`trainer=ddp_cpu`: 2 processes, gloo), run the way users run it:
`python -m alignment ...` in a subprocess, so Lightning re-launches the script for rank 1 and Hydra
configures both processes.

A small Lightning callback, `TrainingProbe`, is added to those runs with a Hydra override. It records
what each rank really trained on (tokens, steps), which parameters got no gradient, and a fingerprint
of the final weights, so the tests compare the logged numbers with what the two processes did.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import torch

from alignment import PROJECT_ROOT
from tests.conftest import TINY

EVAL_HEADER = "Misaligned % of generated sentences"
# The probe writes one file per rank into the job's own output folder.
PROBE = ["+callbacks.probe._target_=tests.test_distributed.TrainingProbe",
         "+callbacks.probe.out_dir=${hydra:runtime.output_dir}/probe"]


class TrainingProbe(pl.Callback):
    """Records, per rank, the tokens of the batches it trained on, the steps, the parameters that got no
    gradient, the value head's norm and a fingerprint of all weights; written to `rank<k>.json`."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.tokens, self.steps, self.without_grad = 0, 0, set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.tokens += int(batch["attention_mask"].sum())

    def on_after_backward(self, trainer, pl_module):
        self.steps += 1
        self.without_grad |= {name for name, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}

    def on_train_end(self, trainer, pl_module):
        weights = torch.cat([p.detach().double().flatten() for p in pl_module.parameters()])
        head = getattr(pl_module.objective, "value_head", None)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "tokens": self.tokens,
                  "steps": self.steps, "without_grad": sorted(self.without_grad),
                  "value_head_norm": None if head is None else float(head.linear.weight.detach().norm()),
                  "fingerprint": [float(weights.sum()), float(weights.norm())]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_alignment(args: list[str], runs_dir: Path, timeout: float, tracking_uri: str | None = None,
                  succeed: bool = True) -> str:
    """`python -m alignment <args>` with its outputs in runs_dir; returns stdout + stderr (both ranks').
    Fails the test on a non-zero exit (on a zero one with succeed=False) or after `timeout` seconds (killing
    rank 1 too)."""
    env = {**os.environ, "ALIGNMENT_RUNS_DIR": str(runs_dir), "HYDRA_FULL_ERROR": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    # cwd = the checkout, so the probe (tests.test_distributed) is importable in both ranks.
    proc = subprocess.Popen([sys.executable, "-m", "alignment", *args], cwd=PROJECT_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds rank 0 and the rank-1 process it started
        output, _ = proc.communicate()
        pytest.fail(f"python -m alignment timed out after {timeout} s (a DDP hang?):\n{output[-4000:]}")
    assert (proc.returncode == 0) == succeed, f"exit code {proc.returncode}:\n{output[-4000:]}"
    return output


def all_runs(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("alignment")
    return client.search_runs([experiment.experiment_id])


def read_probes(job_dir: Path) -> list[dict]:
    probes = [json.loads(p.read_text()) for p in sorted((job_dir / "probe").glob("rank*.json"))]
    assert [p["rank"] for p in probes] == [0, 1], "both ranks must have trained"
    return probes


@pytest.fixture(scope="module")
def cache_dir(runs_dir) -> str:
    """Scores, tokenizers and datasets shared by the subprocess runs of this session."""
    return str(runs_dir / "cache")


@pytest.mark.slow
def test_ddp_run_trains_on_two_processes_and_tracks_once(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    output = run_alignment(["trainer=ddp_cpu", *TINY, f"paths.cache_dir={cache_dir}", *PROBE], runs, timeout=240)

    # One Hydra run folder: rank 1 ran inside rank 0's (its log is there), not in one of its own.
    assert sorted(p.name for p in runs.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.lock", "single"]
    (job_dir,) = (runs / "single").glob("*/*")
    assert job_dir.name.endswith("_toxsen-conditional")
    assert (job_dir / "train_ddp_process_1.log").exists() and (job_dir / ".hydra" / "config.yaml").exists()

    # One MLflow run (rank 1 logs nothing), finished, with training and validation curves.
    tracking_uri = f"sqlite:///{runs}/mlflow.db"
    (mlrun,) = all_runs(tracking_uri)
    assert (mlrun.info.run_name, mlrun.info.status) == ("toxsen-conditional", "FINISHED")
    assert (job_dir / "mlflow_run_id").read_text() == mlrun.info.run_id
    for key in ("train/loss", "train/tokens_seen", "val/loss", "val/loss_untagged", "val/perplexity",
                "eval/nontoxic-pos/joint/misaligned"):
        assert key in mlrun.data.metrics, key

    # Both ranks took the 6 steps in lockstep, every parameter got a gradient, and DDP kept the two
    # copies of the model identical.
    rank0, rank1 = read_probes(job_dir)
    assert rank0["world_size"] == 2 and rank0["steps"] == rank1["steps"] == 6
    assert rank0["without_grad"] == rank1["without_grad"] == []
    assert rank0["fingerprint"] == pytest.approx(rank1["fingerprint"], rel=1e-12)

    # tokens_seen counts what both processes read (their batches differ in length, so rank 0's count
    # times 2 is not it).
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(mlrun.info.run_id, "train/tokens_seen")
    assert len(history) == 6
    assert max(m.value for m in history) == rank0["tokens"] + rank1["tokens"]

    # Saved and evaluated once, by rank 0: the model folder and its MLflow copy, one table.
    saved = sorted(str(p.parent.relative_to(runs)) for p in runs.rglob("model.safetensors"))
    assert saved == [f"mlartifacts/{mlrun.info.run_id}/artifacts/model", str((job_dir / "model").relative_to(runs))]
    assert output.count(EVAL_HEADER) == 1 and output.count("MLflow run: ") == 1


@pytest.mark.slow
def test_ddp_jobs_in_a_sweep_awr_value_head(tmp_path, cache_dir):
    """Two DDP jobs in one Hydra multirun: each job's rank 1 re-runs that job in that job's folder (not
    the whole sweep), the second job gets a fresh process group, and AWR's value head trains under DDP
    while RWR's stays at zero."""
    runs = tmp_path / "runs"
    output = run_alignment(["-m", "trainer=ddp_cpu", "task=toxicity", "objective=awr,rwr", *TINY,
                            f"paths.cache_dir={cache_dir}", "save_model=false", *PROBE], runs, timeout=300)

    # no runs/single
    assert sorted(p.name for p in runs.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.lock", "multi"]
    (sweep_dir,) = (runs / "multi").glob("*/*")
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "report")
    assert jobs == ["0_toxicity-awr", "1_toxicity-rwr"]
    assert (sweep_dir / "report" / "report.md").exists()  # the sweep's comparison report, written once

    # One parent (this sweep's), two children; nothing from the rank-1 processes.
    mlruns = all_runs(f"sqlite:///{runs}/mlflow.db")
    parents = [r for r in mlruns if "mlflow.parentRunId" not in r.data.tags]
    assert len(mlruns) == 3 and len(parents) == 1
    assert parents[0].info.run_id == (sweep_dir / "mlflow_parent_run_id").read_text()
    assert sorted(r.info.run_name for r in mlruns if r not in parents) == ["toxicity-awr", "toxicity-rwr"]
    assert {r.info.status for r in mlruns} == {"FINISHED"}

    for job in jobs:
        assert (sweep_dir / job / "train_ddp_process_1.log").exists()
        rank0, rank1 = read_probes(sweep_dir / job)
        assert rank0["steps"] == rank1["steps"] == 6
        assert rank0["without_grad"] == rank1["without_grad"] == []
        assert rank0["fingerprint"] == pytest.approx(rank1["fingerprint"], rel=1e-12)
        assert rank0["value_head_norm"] == rank1["value_head_norm"]
    awr_head = read_probes(sweep_dir / "0_toxicity-awr")[0]["value_head_norm"]
    rwr_head = read_probes(sweep_dir / "1_toxicity-rwr")[0]["value_head_norm"]
    assert awr_head > 0  # zero-initialised, trained by the value loss
    assert rwr_head == 0.0  # alpha = 1: zero gradients (not none, or DDP would fail), so it never moves
    assert output.count(EVAL_HEADER) == 2
