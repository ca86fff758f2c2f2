"""Sentiment from VADER (vaderSentiment 3.3, lexicon shipped with the package).

Two rules, both "higher is better" (more positive = aligned):
- "compound": VADER's normalised compound score in [-1, 1]. Usual bands: >= 0.05 positive, <= -0.05 negative,
  between them neutral.
- "study_b": the student study's rule, "sentiment = the larger of VADER's neg / pos proportions, ties ->
  negative", written as one number: score = pos - neg (in [-1, 1]). Then `score <= 0 -> negative` gives exactly
  their labels, including the quirk that an all-neutral sentence (pos = neg = 0) counts as negative. The
  proportions are VADER's rounded (3-decimal) values, as the study used them, so equal proportions subtract to
  exactly 0.
"""

from __future__ import annotations

import functools

import numpy as np

from alignment.scorers.base import HIGHER_IS_BETTER, Scorer, package_version

RULES = ("compound", "study_b")


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class Vader(Scorer):
    """VADER sentiment in [-1, 1] under the chosen rule. Higher is better."""

    name = "vader"
    better = HIGHER_IS_BETTER
    low = -1.0
    high = 1.0

    def __init__(self, rule: str = "compound"):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        self.rule = rule

    def settings(self) -> dict:
        return {"rule": self.rule, "package": package_version("vaderSentiment")}

    def score(self, texts: list[str]) -> np.ndarray:
        analyzer = _analyzer()
        polarities = [analyzer.polarity_scores(text) for text in texts]
        if self.rule == "compound":
            return np.array([p["compound"] for p in polarities], dtype=np.float64)
        return np.array([p["pos"] - p["neg"] for p in polarities], dtype=np.float64)
