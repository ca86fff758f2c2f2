"""Every metric against values worked out by hand."""
import math

import pytest

from alignment.evaluation.metrics import (
    distinct_n,
    expected_max_score,
    mean_score,
    misaligned_share,
    share_above,
)


def test_misaligned_share():
    assert misaligned_share([0, 1, 1, 2], wanted=1) == 2 / 4
    assert misaligned_share([1, 1], wanted=1) == 0.0


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


@pytest.mark.parametrize("metric", [
    lambda: misaligned_share([], 1), lambda: mean_score([]), lambda: share_above([]), lambda: expected_max_score([]),
    lambda: distinct_n([], 2),
])
def test_empty_inputs_give_nan(metric):
    assert math.isnan(metric())
