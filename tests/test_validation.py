"""Bad options fail at once, with one message naming the option, the bad value and what is allowed, and leave
nothing behind: no MLflow store or run, no cache entry, no checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from alignment import PROJECT_ROOT
from alignment.train import run
from alignment.validation import SERVER_TIMEOUT, ConfigError, validate

BAD_INPUTS = [  # (overrides, a line the message must hold)
    (["eval.sampling.top_p=0"], "eval.sampling.top_p=0: must be a number in (0, 1]"),
    (["eval.guidance_scales=[abc]"], "eval.guidance_scales=['abc']: must be a non-empty list of numbers"),
    (["eval.guidance_scales=[]"], "eval.guidance_scales=[]: must be a non-empty list of numbers"),
    (["task.untagged_fraction=1.5"], "task.untagged_fraction=1.5: must be a number in [0, 1]"),
    (["eval.mode=promptd"], "eval.mode='promptd': must be one of unconditional, prompted"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0: must be a number in (0, 1)"),
    (["data.val_fraction=0"], "data.val_fraction=0: must be a number in (0, 1)"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc': must be an integer >= -1"),
    (["model=pretrained", "model.pretrained=/no/such/dir"], "model.pretrained=/no/such/dir: the folder does not exist"),
    (["eval.reference.path=./no/such/model"], "eval.reference.path=./no/such/model: the folder does not exist"),
    (["data=files", "data.source.paths=/no/such/*.txt"], "data.source.paths: no file matches '/no/such/*.txt'"),
    (["eval.control_placement=middle"], "eval.control_placement='middle': must be one of before, after"),
    (["eval.sampling.temperature=-1"], "eval.sampling.temperature=-1: must be a number in [0, inf]"),
    (["eval.sampling.top_k=-3"], "eval.sampling.top_k=-3: must be an integer >= 0"),
    (["eval.sampling.min_new_tokens=10"], "eval.sampling.min_new_tokens=10: must be <= eval.sampling.max_new_tokens=8"),
    (["eval.missing=never"], "eval.missing='never': must be one of sample, untagged"),
    (["eval.combinations=some"], "eval.combinations='some': must be all, core, aligned or a list of conditioning"),
    (["eval.num_samples=0"], "eval.num_samples=0: must be an integer >= 1"),
    (["task.threshold={quantile: 1.5}"], "task.threshold={'quantile': 1.5}: must be a number or {quantile: q} with q"),
    (["task.placement=everywhere"], "task: task 'toxsen': placement must be 'sentence' or 'document', got 'every"),
    (["task.attributes.toxicity.untagged_fraction=2"],
     "task: attribute 'toxicity': untagged_fraction must be in [0, 1], got 2.0"),
    (["task.attributes.toxicity.aligned='<|kind|>'"], "task: attribute 'toxicity': aligned='<|kind|>' is not one of"),
    (["task.attributes.toxicity.thresholds=[0.5,0.2]"], "task: attribute 'toxicity': 2 thresholds make 3 levels"),
    (["objective=unlikelihood", "objective.loss.alpha=-1"],
     "objective.loss: alpha must be in [0, 1] (the weight of the unlikelihood term), got -1"),
    (["objective=awr", "objective.loss.beta=0"], "objective.loss: beta must be > 0"),
    (["datamodule.batch_size=0"], "datamodule.batch_size=0: must be an integer >= 1"),
    (["module.optimizer.lr=0"], "module.optimizer.lr=0: must be a number in (0, inf]"),
    (["module.scheduler.name=step"], "module.scheduler.name='step': must be one of linear, cosine, cosine_with_res"),
    (["module.scheduler.name=linear"], "module.scheduler.min_lr_rate=0.1: a floor only cosine_with_min_lr and "),
    (["trainer.precision=8-bit"], "trainer.precision='8-bit': must be one of 32-true"),
    (["trainer.accelerator=abacus"], "trainer.accelerator='abacus': must be one of cpu, gpu"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0: must be an integer >= 1 (steps)"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0: must be an integer >= 1"),
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["evaluate=maybe"], "evaluate='maybe': must be true or false"),
    (["data.layout=paragraph"], "data.layout='paragraph': must be one of sentence, document, packed"),
    (["data.sentences.rule=loose"], "data.sentences.rule='loose': must be one of gentle, strict"),
    (["data.sentences.max_words=2"], "data.sentences.max_words=2: must be >= data.sentences.min_words=4"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_a_bad_option_stops_the_run_before_anything_is_written(tiny_config, tmp_path, overrides, expected):
    store, cache = tmp_path / "mlflow.db", tmp_path / "cache"
    cfg = tiny_config(*overrides, f"logger.tracking_uri=sqlite:///{store}", f"paths.cache_dir={cache}")
    with pytest.raises(ConfigError) as error:
        run(cfg)
    message = str(error.value)
    assert message.startswith("Invalid configuration, nothing was run:\n")
    assert any(line.strip().startswith(expected) for line in message.splitlines()), message
    assert len(error.value.problems) == 1, message  # the shipped defaults themselves raise nothing
    assert not store.exists() and not cache.exists()  # no MLflow run, no data build
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no checkpoint, config or model


def test_every_problem_is_listed_at_once(tiny_config):
    cfg = tiny_config("eval.sampling.top_p=0", "eval.mode=promptd", "trainer.max_steps=abc")
    with pytest.raises(ConfigError) as error:
        validate(cfg, check_server=False)
    assert [p.split(":")[0] for p in error.value.problems] == [
        "trainer.max_steps='abc'", "eval.mode='promptd'", "eval.sampling.top_p=0"]


def test_the_shipped_experiments_pass(tiny_config):
    for overrides in ([], ["experiment=study_b"], ["experiment=korbak_pep8", "objective=awr"], ["objective=filtering"]):
        validate(tiny_config(*overrides), check_server=False)


def test_an_unreachable_tracking_server_is_named_within_seconds(tiny_config):
    cfg = tiny_config("logger.tracking_uri=http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"logger.tracking_uri=http://127.0.0.1:9: the MLflow tracking server does "
                                          r"not answer within 5 s"):
        validate(cfg)
    assert time.monotonic() - start < SERVER_TIMEOUT


def test_the_command_line_prints_the_message_without_a_traceback(tmp_path):
    env = dict(os.environ, ALIGNMENT_RUNS_DIR=str(tmp_path), MLFLOW_TRACKING_URI="http://127.0.0.1:9",
               PYTHONPATH=str(PROJECT_ROOT))
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "alignment", "eval.mode=promptd"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines()[:3] == [
        "Error: Invalid configuration, nothing was run:",
        "  eval.mode='promptd': must be one of unconditional, prompted",
        "  logger.tracking_uri=http://127.0.0.1:9: the MLflow tracking server does not answer within 5 s "
        "([Errno 111] Connection refused); start it, or unset MLFLOW_TRACKING_URI to use the local store"]
    assert "Traceback" not in done.stderr and not (tmp_path / "mlflow.db").exists()
    # Hydra made the run folder (its .hydra copies, the log) before the check: gone again, its date folder too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single"] and not any((tmp_path / "single").iterdir())
