"""The sqlite score cache: hits, deduplication, resuming after an interruption, keys, two processes at once."""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest

from alignment.scorers.base import Scorer
from alignment.scorers.cache import ScoreCache, score_with_cache, text_hash
from alignment.scorers.vader import Vader


class LengthScorer(Scorer):
    """Score = number of characters + offset; remembers every batch it was asked to score."""

    name = "length"
    low, high = 0.0, float("inf")

    def __init__(self, offset: float = 0.0, fail_on_batch: int | None = None):
        self.offset = offset
        self.fail_on_batch = fail_on_batch  # simulates a crash; not a setting (it changes no score)
        self.batches: list[list[str]] = []

    def settings(self) -> dict:
        return {"offset": self.offset}

    def score(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if self.fail_on_batch is not None and len(self.batches) == self.fail_on_batch:
            raise KeyboardInterrupt("interrupted while scoring")
        return np.array([len(text) + self.offset for text in texts], dtype=np.float64)

    @property
    def texts_scored(self) -> list[str]:
        return [text for batch in self.batches for text in batch]


TEXTS = ["a", "bb", "ccc", "dddd", "eeeee"]


def test_text_hash_is_sha1_of_utf8():
    assert text_hash("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"  # the FIPS 180 test vector
    assert text_hash("é") != text_hash("e")


def test_second_run_is_served_from_the_cache(tmp_path):
    first = LengthScorer()
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        np.testing.assert_array_equal(score_with_cache(first, TEXTS, cache), [1, 2, 3, 4, 5])
    assert first.texts_scored == TEXTS

    again = LengthScorer()
    with ScoreCache(tmp_path / "scores.sqlite") as cache:  # a new connection: the scores are on disk
        scores = score_with_cache(again, TEXTS[::-1], cache)
    np.testing.assert_array_equal(scores, [5, 4, 3, 2, 1])
    assert again.batches == []


def test_duplicates_are_scored_once_and_batches_have_the_requested_size(tmp_path):
    scorer = LengthScorer()
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        scores = score_with_cache(scorer, TEXTS + ["a", "ccc", "a"], cache, batch_size=2)
        assert cache.count(scorer.cache_key()) == 5
    np.testing.assert_array_equal(scores, [1, 2, 3, 4, 5, 1, 3, 1])
    assert scorer.batches == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]


def test_interrupted_run_resumes_with_only_the_remaining_texts(tmp_path):
    crashing = LengthScorer(fail_on_batch=2)
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        with pytest.raises(KeyboardInterrupt):
            score_with_cache(crashing, TEXTS, cache, batch_size=2)
    # batch 1 was committed before batch 2 failed
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        assert cache.count() == 2
        resumed = LengthScorer()
        np.testing.assert_array_equal(score_with_cache(resumed, TEXTS, cache, batch_size=2), [1, 2, 3, 4, 5])
    assert resumed.texts_scored == ["ccc", "dddd", "eeeee"]


def test_different_settings_get_different_keys_and_separate_scores(tmp_path):
    plain, shifted = LengthScorer(offset=0.0), LengthScorer(offset=10.0)
    assert plain.cache_key() != shifted.cache_key()
    assert Vader("compound").cache_key() != Vader("study_b").cache_key()
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        score_with_cache(plain, TEXTS, cache)
        np.testing.assert_array_equal(score_with_cache(shifted, TEXTS, cache), [11, 12, 13, 14, 15])
        assert shifted.texts_scored == TEXTS
        assert cache.count() == 10


def test_without_a_cache_texts_are_still_deduplicated():
    scorer = LengthScorer()
    np.testing.assert_array_equal(score_with_cache(scorer, ["xy", "xy", "z"], None), [2, 2, 1])
    assert scorer.texts_scored == ["xy", "z"]
    assert score_with_cache(scorer, [], None).shape == (0,)


def test_wrong_or_nan_scores_are_refused_before_they_reach_the_cache(tmp_path):
    class Broken(LengthScorer):
        def __init__(self, result):
            super().__init__()
            self.result = result

        def score(self, texts):
            return self.result

    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        with pytest.raises(ValueError, match="returned"):
            score_with_cache(Broken(np.array([1.0])), ["a", "b"], cache)
        with pytest.raises(ValueError, match="NaN"):
            score_with_cache(Broken(np.array([np.nan])), ["a"], cache)
        assert cache.count() == 0


def test_progress_bar_goes_to_stderr_not_stdout(tmp_path, capsys):
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        score_with_cache(LengthScorer(), TEXTS, cache, progress=True)
    assert capsys.readouterr().out == ""


def _score_in_another_process(path: str, start: int) -> None:
    texts = [f"text number {i}" for i in range(start, start + 3000)]
    with ScoreCache(path) as cache:
        score_with_cache(LengthScorer(), texts, cache, batch_size=10)  # 300 commits each


def test_two_processes_can_fill_the_same_cache_at_once(tmp_path):
    path = str(tmp_path / "scores.sqlite")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_score_in_another_process, args=(path, start)) for start in (0, 1500)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = connection.execute("SELECT COUNT(*), SUM(score) FROM scores").fetchone()
    assert rows[0] == 4500  # the 1500 texts both processes scored are stored once
    assert rows[1] == sum(len(f"text number {i}") for i in range(4500))
