"""Run folders: each run gets a folder of its own even when started in the same second as another."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from alignment import CONF_DIR


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
