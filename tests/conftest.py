"""Shared fixtures: compose the real configs with Hydra's compose API and shrink them."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from alignment import CONF_DIR

# A tiny but complete experiment: tiny model, a few hundred tweets, a few steps, a few samples.
TINY = [
    "model=tiny",
    "data.source.limit=400",
    "trainer.max_epochs=1",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.precision=32-true",
    "callbacks=alignment_curve",  # the curve only: no checkpoints, no lr monitor
    "datamodule.batch_size=8",
    "datamodule.progress=false",
    "module.scheduler.warmup_steps=2",
    "eval.num_samples=4",
    "eval.sampling.max_new_tokens=8",
    "eval.sampling.min_new_tokens=2",
    "log_mlflow_model=false",  # 8 s each; test_pipeline's end-to-end test logs one
]


SLOW_TEST_TIMEOUT = 2400  # seconds; a slow test (DDP, sweeps, a 300-step run) takes up to ~4 min on 2 cores


def pytest_collection_modifyitems(config, items):
    """Slow tests get a longer timeout than pyproject's per-test `timeout`, unless they set their own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))

def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package (here the hydra_plugins namespace) is absent too
        return True


#: The optional cluster launcher (`pip install -e '.[slurm]'`).
SUBMITIT_MISSING = _missing("hydra_plugins.hydra_submitit_launcher")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """One runs/ folder per test session, so the score cache is shared between tests."""
    path = tmp_path_factory.mktemp("runs")
    os.environ["ALIGNMENT_RUNS_DIR"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return path


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` as `python -m alignment <overrides>` would, and make the Hydra
    runtime (output dir) available the way @hydra.main does, minus the `hydra` node itself."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    output_dir.mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture
def tiny_config(runs_dir, tmp_path):
    """Factory: the tiny experiment plus extra overrides."""

    def make(*extra: str) -> DictConfig:
        return compose_config(TINY + list(extra), tmp_path / "out")

    return make
