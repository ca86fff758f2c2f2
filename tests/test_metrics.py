"""Every metric against values worked out by hand."""
import math

import pytest

from alignment.evaluation.metrics import (
    distinct_n,
    expected_max_score,
    joint_misaligned_share,
    mean_score,
    misaligned_share,
    self_bleu,
    share_above,
    token_entropy,
)


def test_misaligned_share():
    assert misaligned_share([0, 1, 1, 2], wanted=1) == 2 / 4
    assert misaligned_share([1, 1], wanted=1) == 0.0


def test_joint_misaligned_share_counts_a_sentence_once_if_any_attribute_is_contradicted():
    levels = {"toxicity": [0, 0, 1, 1], "sentiment": [1, 0, 1, 0], "ignored": [5, 5, 5, 5]}
    # sentence 0 fits both; 1 has the wrong sentiment; 2 is toxic; 3 is both wrong (counted once)
    assert joint_misaligned_share(levels, {"toxicity": 0, "sentiment": 1}) == 3 / 4
    assert joint_misaligned_share(levels, {"toxicity": 0}) == 2 / 4


def test_joint_misaligned_share_rejects_mismatched_attributes():
    with pytest.raises(ValueError):
        joint_misaligned_share({"toxicity": [0, 1], "sentiment": [1]}, {"toxicity": 0, "sentiment": 1})
    with pytest.raises(ValueError):
        joint_misaligned_share({"toxicity": [0]}, {})


def test_mean_score_and_share_above():
    assert mean_score([0.1, 0.2, 0.6]) == pytest.approx(0.3)
    assert share_above([0.5, 0.51, 0.2, 0.9]) == 2 / 4  # 0.5 itself is not above 0.5
    assert share_above([0.5, 0.51, 0.2, 0.9], threshold=0.1) == 1.0


def test_expected_max_score_drops_the_partial_last_chunk():
    scores = [0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.95]
    # chunks of 3: max 0.5 and 0.9; the lone 0.95 is dropped (keeping it would give 0.7833)
    assert expected_max_score(scores, chunk_size=3) == pytest.approx((0.5 + 0.9) / 2)
    assert math.isnan(expected_max_score(scores, chunk_size=25))  # no full chunk
    assert expected_max_score([0.2] * 50) == pytest.approx(0.2)


def test_distinct_n():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == 3 / 7  # a b a b a b c
    assert distinct_n(texts, 2) == 3 / 5  # ab ba ab | ab bc
    assert math.isnan(distinct_n(["a b", "c d"], 3))  # no trigram crosses a text boundary


def test_token_entropy():
    assert token_entropy(["a a b", "c"]) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4
    assert token_entropy(["a a"]) == 0.0


def test_self_bleu_by_hand():
    # Each text against the other: unigram precision 2/3, bigram 1/2, trigram 0 -> smoothed 0.1/1, equal lengths.
    assert self_bleu(["a b c", "a b d"], n=2) == pytest.approx(math.sqrt(2 / 3 * 1 / 2))
    assert self_bleu(["a b c", "a b d"], n=3) == pytest.approx((2 / 3 * 1 / 2 * 0.1) ** (1 / 3))
    # Brevity penalty: "a b" (2 tokens) against "a b c d" (4): exp(1 - 4/2); the long one: sqrt(2/4 * 1/3).
    assert self_bleu(["a b", "a b c d"], n=2) == pytest.approx((math.exp(-1) + math.sqrt(1 / 6)) / 2)
    # Clipping: "the" x3 matches only once in "the cat" -> 1/3; "the cat": 1/2 with penalty exp(1 - 3/2).
    assert self_bleu(["the the the", "the cat"], n=1) == pytest.approx((1 / 3 + 0.5 * math.exp(-0.5)) / 2)
    # A text's own counts never serve as its reference: "x x" sees at most one x elsewhere -> 1/2; "x" -> 1;
    # "y" has no unigram match -> 0.
    assert self_bleu(["x x", "x", "y"], n=1) == pytest.approx(0.5)
    assert self_bleu(["the very same five words"] * 300) == pytest.approx(1.0)
    # Texts shorter than n have no 5-grams, so orders 4 and 5 count as smoothed 0.1 matches: (0.1 * 0.1) ** (1/5).
    assert self_bleu(["same three words"] * 2) == pytest.approx(0.01 ** 0.2)


def test_self_bleu_agrees_with_nltk():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    texts = ["the cat sat on the mat today", "the cat ate the mat", "a dog sat on a log", "on the mat the cat sat",
             "", "dog dog dog"]
    words = [text.split() for text in texts]
    expected = sum(nltk_bleu.sentence_bleu([w for j, w in enumerate(words) if j != i], hypothesis,
                                           smoothing_function=nltk_bleu.SmoothingFunction().method1)
                   for i, hypothesis in enumerate(words)) / len(words)
    assert self_bleu(texts, n=4) == pytest.approx(expected)


def test_self_bleu_subsample_is_seeded():
    # Five "x" and five "y": each text has a twin, so all ten score 1; a drawn pair scores 1 if twins, 0 if not.
    texts = ["x"] * 5 + ["y"] * 5
    assert self_bleu(texts, n=1) == 1.0
    by_seed = [self_bleu(texts, n=1, max_texts=2, seed=seed) for seed in range(20)]
    assert set(by_seed) == {0.0, 1.0}  # two texts were drawn, and which two depends on the seed...
    assert [self_bleu(texts, n=1, max_texts=2, seed=seed) for seed in range(20)] == by_seed  # ...and only on it


@pytest.mark.parametrize("metric", [
    lambda: misaligned_share([], 1), lambda: joint_misaligned_share({"a": []}, {"a": 1}), lambda: mean_score([]),
    lambda: share_above([]), lambda: expected_max_score([]), lambda: distinct_n([], 2), lambda: token_entropy([""]),
    lambda: self_bleu(["only one"]),
])
def test_empty_inputs_give_nan(metric):
    assert math.isnan(metric())
