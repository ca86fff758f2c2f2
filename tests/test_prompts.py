"""Prompts for the prompted evaluation: the default (first words of held-out sentences) and study B's balanced pool
of whole short sentences, on fabricated held-out sentences whose levels are known."""
from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from alignment.evaluation.evaluator import prompt_texts
from alignment.task import Task
from tests.conftest import compose_config

# held-out sentences per (toxicity, sentiment) level: 0 = nontoxic / neg, 1 = toxic / pos (study B's two levels)
SIZES = {(0, 0): 5, (0, 1): 3, (1, 0): 4, (1, 1): 2}
SHORT = [{"text": f"tox {t} sen {s} number {i} here", "toxicity": t, "sentiment": s}
         for (t, s), n in SIZES.items() for i in range(n)]
LONG = [{"text": "long " * 16 + f"tox {t} sen {s}", "toxicity": t, "sentiment": s} for t, s in SIZES]  # 19 words


@pytest.fixture(scope="module")
def task(runs_dir, tmp_path_factory) -> Task:
    cfg = compose_config(["task=toxsen", "attribute@task.attributes.sentiment=sentiment_study_b"],
                         tmp_path_factory.mktemp("out"))
    return Task.from_config(cfg.task)


def study_b(**changes):
    base = dict(mode="prompted", num_samples=8, seed=0, prompt_words=None, prompt_max_words=17,
                prompt_balance=["toxicity", "sentiment"], prompt_pool=8)
    return OmegaConf.create(base | changes)


def combo(text: str) -> tuple[int, int]:
    words = text.split()
    return int(words[words.index("tox") + 1]), int(words[words.index("sen") + 1])


def test_the_pool_is_balanced_whole_and_short(task):
    prompts = prompt_texts(SHORT + LONG, study_b(), task)
    assert len(prompts) == 8 == len(set(prompts))
    assert Counter(combo(p) for p in prompts) == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2}
    assert all(p in {s["text"] for s in SHORT} for p in prompts)  # whole sentences, none of 17 words or more


def test_prompts_are_a_seeded_sample_of_the_pool(task):
    prompts = prompt_texts(SHORT + LONG, study_b(num_samples=3), task)
    assert len(prompts) == 3 and set(prompts) < set(prompt_texts(SHORT + LONG, study_b(), task))
    assert prompt_texts(SHORT + LONG, study_b(num_samples=3), task) == prompts
    other_seeds = {tuple(prompt_texts(SHORT, study_b(num_samples=3, seed=seed), task)) for seed in range(1, 6)}
    assert other_seeds - {tuple(prompts)}


def test_a_combination_too_rare_for_its_share_fails_clearly(task):
    with pytest.raises(ValueError, match=r"only 2 held-out prompt sentences are toxic/pos; .* needs 3"):
        prompt_texts(SHORT, study_b(prompt_pool=12), task)
    with pytest.raises(ValueError, match="does not split evenly over 4"):
        prompt_texts(SHORT, study_b(prompt_pool=6), task)
    with pytest.raises(ValueError, match="must name attributes of the task"):
        prompt_texts(SHORT, study_b(prompt_balance=["pii"]), task)


def test_the_default_prompt_is_the_first_words_of_any_sentence(task):
    cfg = OmegaConf.create(dict(mode="prompted", num_samples=100, seed=0, prompt_words=4))
    prompts = prompt_texts(SHORT + LONG, cfg, task)
    assert len(prompts) == len(SHORT) + len(LONG) and all(len(p.split()) == 4 for p in prompts)
    assert Counter(prompts)["long long long long"] == len(LONG)
