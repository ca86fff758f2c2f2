"""The studies' experiment files compose to the values the studies published (their public configs)."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment import CONF_DIR
from alignment.objectives import AWR, MLE, RWR, Unlikelihood
from alignment.scorers.pii import STUDY_A_DETECTORS
from tests.conftest import compose_config

OBJECTIVES = ["mle", "filtering", "conditional", "unlikelihood", "awr", "rwr"]


def compose(tmp_path, *overrides):
    cfg = compose_config(list(overrides), tmp_path)
    OmegaConf.resolve(cfg)
    return cfg


def effective_batch(cfg) -> int:
    return cfg.datamodule.batch_size * cfg.trainer.accumulate_grad_batches


# study A: (task, objective) -> lr, effective batch of 1024-token blocks, steps, loss settings
STUDY_A = {
    ("toxicity", "awr"): (1e-3, 1024, 3147, {"alpha": 0.5, "beta": 10.0, "detach_value_head": False}),
    ("toxicity", "rwr"): (5e-4, 1024, 3147, {"beta": 10.0, "detach_value_head": False}),
    ("toxicity", "unlikelihood"): (5e-4, 64, 50354, {"threshold": 0.00078, "alpha": 1.0}),
    ("toxicity", "mle"): (5e-4, 64, 50354, {}),
    ("pii", "awr"): (5e-4, 64, 50354, {"alpha": 0.5, "beta": 0.1, "detach_value_head": False}),
    ("pii", "rwr"): (5e-4, 64, 50354, {"beta": 10.0, "detach_value_head": False}),
    ("pii", "unlikelihood"): (5e-4, 64, 50354, {"threshold": 0.000286, "alpha": 1.0}),
    ("pep8", "awr"): (1e-3, 256, 12589, {"alpha": 0.05, "beta": 1.0, "detach_value_head": False}),
    ("pep8", "rwr"): (1e-3, 64, 50354, {"beta": 10.0, "detach_value_head": False}),
    ("pep8", "unlikelihood"): (8e-4, 64, 50354, {"threshold": 0.002361, "alpha": 0.01}),
    ("pep8", "conditional"): (8e-4, 64, 50354, {}),
}


@pytest.mark.parametrize("task,objective", list(STUDY_A), ids=[f"{t}-{o}" for t, o in STUDY_A])
def test_study_a_per_objective_values(runs_dir, tmp_path, task, objective):
    cfg = compose(tmp_path, f"experiment=korbak_{task}", f"objective={objective}")
    lr, batch, steps, loss = STUDY_A[task, objective]
    assert cfg.module.optimizer.lr == pytest.approx(lr)
    assert effective_batch(cfg) == batch and cfg.data.block_size == 1024
    assert cfg.trainer.max_steps == steps and batch * 1024 * steps == pytest.approx(3.3e9, rel=0.001)
    assert cfg.module.scheduler.warmup_steps == round(steps / 100)  # 1% warmup
    loss = dict(loss)
    if "threshold" in loss:  # unlikelihood's threshold is the task's (filtering's too)
        assert cfg.task.threshold == loss.pop("threshold")
    assert {k: cfg.objective.loss[k] for k in loss} == loss  # the literals of the study's configs
    built = instantiate(cfg.objective.loss)  # the values reach the objective itself
    assert type(built) is {"awr": AWR, "rwr": RWR, "unlikelihood": Unlikelihood}.get(objective, MLE)
    if isinstance(built, AWR):
        assert (built.beta, built.detach_value_head) == (loss["beta"], False)


@pytest.mark.parametrize("task,conditional,filtering", [("toxicity", 0.00056, 0.00078), ("pii", 0.0, 0.000286),
                                                         ("pep8", 0.0, 0.002361)])
def test_study_a_thresholds_and_shared_settings(runs_dir, tmp_path, task, conditional, filtering):
    cfg = compose(tmp_path, f"experiment=korbak_{task}", "objective=filtering")
    attribute = cfg.task.attributes[task]
    assert list(attribute.thresholds) == [conditional] and cfg.objective.filter_threshold == filtering
    assert attribute.untagged_fraction == (0.1 if task == "pep8" else 0.01)  # study A's drop_token_fraction
    assert cfg.trainer.max_epochs == -1  # loop over a filtered (shorter) corpus until max_steps, as study A did
    assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.scheduler.name == "linear"
    assert cfg.module.optimizer.weight_decay == 0.1 and cfg.module.scheduler.min_lr_rate is None
    assert cfg.task.eval_unit == "sample"  # study A's metrics are over whole samples
    assert cfg.data.sentences.dedupe is False and cfg.data.layout == "packed" and cfg.data.source.fraction == 1.0
    assert cfg.data.joiner == "" and cfg.data.sentences.min_words == 0  # segments as they were, blanks included
    assert (cfg.eval.num_samples, cfg.eval.sampling.temperature, cfg.eval.sampling.top_p) == (4096, 0.7, 0.9)
    sampling = cfg.eval.sampling  # study A's generate() lengths, prompt included (EOS and the control tokens)
    assert (sampling.max_length, sampling.min_length) == (640 if task == "pep8" else 128, 10)
    assert sampling.max_new_tokens is None and sampling.min_new_tokens is None
    assert cfg.model.arch.reorder_and_upcast_attn is True and cfg.model.arch.n_layer == 12


def test_study_a_toxicity_labels_with_original_and_judges_with_unbiased(runs_dir, tmp_path):
    cfg = compose(tmp_path, "experiment=korbak_toxicity")
    toxicity = cfg.task.attributes.toxicity
    assert toxicity.precomputed == "detoxify_original" and toxicity.scorer.variant == "unbiased"
    names = list(cfg.data.source.name)
    assert len(names) == 39 and names[0] == "tomekkorbak/detoxify-pile-chunk3-0-50000"
    assert names[-1] == "tomekkorbak/detoxify-pile-chunk3-1900000-1950000" and cfg.data.sentences.rule == "raw"


def test_study_a_pii_and_pep8_sources(runs_dir, tmp_path):
    pii = compose(tmp_path / "pii", "experiment=korbak_pii")
    assert pii.data.source.score_name == pii.task.attributes.pii.precomputed == "scrubadub_study_a"
    assert len(pii.data.source.name) == 39 and pii.data.sentences.rule == "raw"
    assert tuple(pii.task.attributes.pii.scorer.detectors) == STUDY_A_DETECTORS  # samples judged as study A did
    pep8 = compose(tmp_path / "pep8", "experiment=korbak_pep8")
    assert pep8.data.source.score_name == pep8.task.attributes.pep8.precomputed == "pycodestyle_line"
    assert pep8.data.source.name == "kejian/codeparrot-train-more-filter-3.3b-cleaned"
    assert pep8.model.tokenizer.name_or_path == "codeparrot/codeparrot-small" and pep8.data.sentences.kind == "code"


def test_every_per_objective_file_matches_an_experiment_and_an_objective():
    """The group is optional and picked by name: a misspelt file would be skipped silently."""
    experiments = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    objectives = {p.stem for p in (CONF_DIR / "objective").glob("*.yaml")}
    files = sorted((CONF_DIR / "experiment_objective").glob("*.yaml"))
    assert files
    for path in files:
        assert any(path.stem == f"{e}_{o}" for e in experiments for o in objectives), path.name


def test_the_projects_own_awr_keeps_the_detached_value_head(runs_dir, tmp_path):
    cfg = compose(tmp_path, "objective=awr")
    assert instantiate(cfg.objective.loss).detach_value_head is True
    assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.optimizer.weight_decay == 0.01


def test_study_b_optimiser_and_evaluation(runs_dir, tmp_path):
    cfg = compose(tmp_path, "experiment=study_b")
    assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.optimizer.lr == 5e-4
    assert cfg.module.optimizer.weight_decay == 0.1 and cfg.module.scheduler.name == "cosine"
    assert effective_batch(cfg) == 512
    assert (cfg.eval.prompt_words, cfg.eval.prompt_max_words, cfg.eval.prompt_pool) == (None, 17, 1000)
    assert list(cfg.eval.prompt_balance) == ["toxicity", "sentiment"] and cfg.eval.num_samples == 400
    assert cfg.eval.sampling.no_repeat_ngram_prompt is True and cfg.eval.sampling.no_repeat_ngram_size == 1
    # study B: max_new_tokens 70, min_length 40 counting its prompt (ours: one token longer, the leading EOS)
    assert (cfg.eval.sampling.max_new_tokens, cfg.eval.sampling.min_length) == (70, 41)
    assert cfg.eval.sampling.min_new_tokens is None and cfg.eval.sampling.max_length is None
    assert cfg.eval.control_placement == "after" and cfg.eval.missing == "untagged"
    assert cfg.task.attributes.toxicity.scorer.variant == "unbiased"
