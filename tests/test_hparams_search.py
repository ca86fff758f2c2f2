"""`hparams_search=optuna`: a real Optuna sweep whose trials are tracked runs and whose objective is a run metric."""
from __future__ import annotations

import math

import mlflow
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from alignment import CONF_DIR
from alignment.__main__ import optimized_value
from tests.conftest import TINY
from tests.test_distributed import run_alignment


def test_optimized_value_names_the_metrics_a_typo_could_have_meant():
    metrics = {"val/loss": 4.2, "_summary/aligned_misaligned": 0.25}
    assert optimized_value(metrics, "_summary/aligned_misaligned") == 0.25
    assert optimized_value(metrics, None) is None
    assert optimized_value({}, "val/loss") is None  # a DDP rank other than 0 returns no metrics
    with pytest.raises(KeyError, match="'val/los' is not among this run's metrics: _summary/aligned_misaligned, val/"):
        optimized_value(metrics, "val/los")


def test_the_search_config_composes_into_an_optuna_sweep():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "_summary/aligned_misaligned"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.hydra.sweeper.sampler.seed == cfg.seed
    assert set(cfg.hydra.sweeper.params) == {"module.optimizer.lr", "module.optimizer.weight_decay",
                                             "trainer.max_steps"}


@pytest.mark.slow
def test_optuna_trials_are_tracked_runs_and_the_best_is_their_minimum(tmp_path, runs_dir):
    runs = tmp_path / "runs"
    # A sweep option on the command line joins (here: replaces) the config's search space.
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=choice(4,6)"]
    tiny = [o for o in TINY if not o.startswith("trainer.max_steps=")]
    run_alignment([*search, "task=tox", *tiny, "save_model=false", f"paths.cache_dir={runs_dir / 'cache'}"],
                  runs, timeout=600)
    (sweep_dir,) = (runs / "multi").glob("*/*")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{runs}/mlflow.db")
    mlruns = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    trials = [r for r in mlruns if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for trial in trials:  # Optuna drew each option inside its range and the run used it
        assert 3e-4 <= float(trial.data.params["module/optimizer/lr"]) <= 3e-3
        assert float(trial.data.params["module/optimizer/weight_decay"]) in (0.0, 0.01, 0.1)
        assert trial.data.params["trainer/max_steps"] in ("4", "6")
    values = [trial.data.metrics["_summary/aligned_misaligned"] for trial in trials]
    assert math.isclose(best["best_value"], min(values), rel_tol=1e-6)
