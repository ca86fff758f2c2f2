"""Levels, thresholds, control-token prefixes and evaluation combinations, on the real task configs."""
from __future__ import annotations

import numpy as np
import pytest

from alignment.scorers.vader import Vader
from alignment.task import Attribute, Task, resolve_threshold
from tests.conftest import compose_config


@pytest.fixture
def toxsen(runs_dir, tmp_path) -> Task:
    return Task.from_config(compose_config(["task=toxsen"], tmp_path).task)


def test_levels_follow_thresholds_inclusively(toxsen):
    tox, sen = toxsen.attributes["toxicity"], toxsen.attributes["sentiment"]
    assert tox.levels(np.array([0.1, 0.2, 0.21])).tolist() == [0, 0, 1]           # score <= 0.2 -> nontoxic
    assert sen.levels(np.array([-0.5, -0.05, 0.0, 0.05, 0.3])).tolist() == [0, 0, 1, 1, 2]
    assert (tox.aligned_level, sen.aligned_level) == (0, 2)
    assert sen.level_names == ["neg", "neu", "pos"]


def test_quantile_thresholds_resolve_on_the_corpus():
    scores = np.arange(101, dtype=float)  # 0..100
    assert resolve_threshold({"quantile": 0.9}, scores) == pytest.approx(90.0)
    assert resolve_threshold(0.25, scores) == 0.25
    with pytest.raises(ValueError, match="quantile"):
        resolve_threshold({"quantile": 1.5}, scores)
    a = Attribute("x", Vader(), [{"quantile": 0.5}], ["<|lo|>", "<|hi|>"], "<|lo|>")
    task = Task("t", {"x": a}, ["x"], threshold={"quantile": 0.1})
    resolved = task.resolve({"x": scores}, combined=scores / 100)
    assert (resolved.attributes["x"].thresholds, resolved.threshold) == ([50.0], pytest.approx(0.1))
    assert (a.thresholds, task.threshold) == ([{"quantile": 0.5}], {"quantile": 0.1})  # the configured task is kept


@pytest.mark.parametrize("kwargs,message", [
    (dict(thresholds=[0.5, 0.1], tokens=["<|a|>", "<|b|>", "<|c|>"]), "strictly ascending"),
    (dict(thresholds=[0.5], tokens=["<|a|>"]), "needs that many tokens"),
    (dict(thresholds=[0.5], tokens=["<|a|>", "<|a|>"]), "distinct"),
])
def test_bad_attribute_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attribute("x", Vader(), aligned="<|a|>", **kwargs)


def test_aligned_must_be_a_token():
    with pytest.raises(ValueError, match="not one of its tokens"):
        Attribute("x", Vader(), [0.0], ["<|a|>", "<|b|>"], "<|c|>")


def test_prefixes_follow_task_order(toxsen):
    toxsen.untagged_fraction = 0.0
    levels = {"toxicity": np.array([0, 1, 0]), "sentiment": np.array([2, 0, 1])}
    prefixes = toxsen.tag_prefixes(levels, np.random.default_rng(0))
    assert prefixes == [["<|nontoxic|>", "<|pos|>"], ["<|toxic|>", "<|neg|>"], ["<|nontoxic|>", "<|neu|>"]]


def test_untagged_fractions(toxsen):
    n = 20_000
    levels = {"toxicity": np.zeros(n, int), "sentiment": np.full(n, 2)}
    toxsen.untagged_fraction = 0.1
    toxsen.attributes["sentiment"].untagged_fraction = 0.5
    prefixes = toxsen.tag_prefixes(levels, np.random.default_rng(0))
    empty = np.mean([p == [] for p in prefixes])
    only_tox = np.mean([p == ["<|nontoxic|>"] for p in prefixes])
    assert empty == pytest.approx(0.1, abs=0.01)
    assert only_tox == pytest.approx(0.9 * 0.5, abs=0.015)


def test_combinations_cover_none_singles_and_pairs(toxsen):
    names = [toxsen.combination_name(c) for c in toxsen.combinations()]
    assert names[0] == "none"
    assert {"nontoxic", "toxic", "neg", "neu", "pos", "nontoxic-pos", "toxic-neg"} <= set(names)
    assert len(names) == 1 + (2 + 3) + 2 * 3
    toxsen.tagged = ["toxicity"]
    assert [toxsen.combination_name(c) for c in toxsen.combinations()] == ["none", "nontoxic", "toxic"]
    toxsen.tagged = []
    assert toxsen.combinations() == [{}]


def test_combined_misalignment_is_the_worst_attribute(toxsen):
    scores = {"toxicity": np.array([0.9, 0.1]), "sentiment": np.array([1.0, -1.0])}  # vader: 1 -> 0, -1 -> 1
    assert toxsen.combined_misalignment(scores).tolist() == pytest.approx([0.9, 1.0])
    toxsen.combine = "mean"
    assert toxsen.combined_misalignment(scores).tolist() == pytest.approx([0.45, 0.55])


def test_unknown_tagged_attribute(runs_dir, tmp_path):
    cfg = compose_config(["task=toxsen", "task.tagged=[toxicity,humour]"], tmp_path)
    with pytest.raises(ValueError, match="humour"):
        Task.from_config(cfg.task)
