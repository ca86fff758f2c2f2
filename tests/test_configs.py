"""Every option of every config group composes; bad overrides fail with a clear message."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from alignment import CONF_DIR
from tests.conftest import SUBMITIT_MISSING, compose_config

GROUPS = ["task", "objective", "model", "data", "eval", "trainer", "logger", "callbacks", "paths", "experiment",
          "debug"]
# `_base` files hold what a group's options share: not options themselves.
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("[!_]*.yaml"))]
# Options whose mandatory values (`???`) a user must give, with example values.
REQUIRED = {("data", "hf"): ["data.source.name=some/dataset"], ("data", "files"): ["data.source.paths=/tmp/*.txt"],
            ("model", "pretrained"): ["model.pretrained=/tmp/model"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(runs_dir, tmp_path, group, option):
    cfg = compose_config([f"{group}={option}"] + REQUIRED.get((group, option), []), tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.run_name == f"{cfg.task.name}-{cfg.objective.name}"


def test_each_group_has_options():
    for group in GROUPS + ["scorer", "attribute"]:
        assert list((CONF_DIR / group).glob("*.yaml")), group


def test_outputs_go_under_runs_dir(runs_dir, tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.paths.runs_dir == str(runs_dir)
    assert cfg.paths.mlflow_uri == f"sqlite:///{runs_dir}/mlflow.db"


def test_unknown_option_fails_clearly(runs_dir, tmp_path):
    with pytest.raises(ConfigCompositionException, match="objective"):
        compose_config(["objective=does_not_exist"], tmp_path)


def test_cli_help_lists_every_group():
    out = subprocess.run([sys.executable, "-m", "alignment", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for group, option in OPTIONS:
        assert group in out.stdout and option in out.stdout
    assert out.stdout.startswith("alignment is powered by Hydra.\nUsage: python -m alignment ")
    assert "`attribute` and `scorer` are not top-level choices: they are sub-groups of a task" in out.stdout
    assert "attribute@task.attributes.sentiment=sentiment_study_b" in out.stdout


def test_apps_are_named_after_their_module(runs_dir, tmp_path):
    """The job's name (log file <name>.log, --help header, SLURM job name) is the module a user runs."""
    for config_name, name in (("config", "alignment"), ("evaluate", "alignment.evaluate")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=["run=x"] if config_name == "evaluate" else [],
                          return_hydra_config=True)
        assert cfg.hydra.job.name == name
        logging = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
        assert logging["handlers"]["file"]["filename"].endswith("/${hydra.job.name}.log")


def test_cli_bad_override_message():
    out = subprocess.run([sys.executable, "-m", "alignment", "objective=nope"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "Could not find 'objective/nope'" in out.stderr and "Available options" in out.stderr


@pytest.mark.parametrize("argument", ["--help", "objective=nope"])
def test_cli_answers_help_and_config_errors_without_the_heavy_imports(argument):
    """Start-up stays within a few seconds: the slow imports (torch, Lightning, transformers, MLflow) wait until a
    run starts. `-X importtime` lists every module the process imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "alignment", argument], capture_output=True,
                         text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "hydra" in imported  # the listing works
    assert not imported & {"torch", "pytorch_lightning", "lightning", "transformers", "mlflow"}


def slurm_launcher(*overrides: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.skipif(SUBMITIT_MISSING, reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
def test_slurm_preset_asks_for_one_task_per_device(runs_dir):
    launcher = slurm_launcher("trainer=ddp", "trainer.devices=4")
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 1)
    assert (launcher["cpus_per_task"], launcher["mem_gb"], launcher["timeout_min"], launcher["name"]) == (
        8, 32, 720, "alignment")
    assert launcher["setup"][1:] == [f"export ALIGNMENT_RUNS_DIR={runs_dir}",
                                     f"export MLFLOW_TRACKING_URI=sqlite:///{runs_dir}/mlflow.db"]
    cpu = slurm_launcher()  # trainer=cpu: one task, no GPU requested
    assert (cpu["gpus_per_node"], cpu["tasks_per_node"]) == (None, 1)
    with pytest.raises(Exception, match=r"give trainer.devices as a number .* not -1"):
        slurm_launcher("trainer=ddp")  # devices -1 (every GPU): unknown to SLURM
