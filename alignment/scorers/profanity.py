"""Profanity probability from alt-profanity-check (TF-IDF + linear SVM, calibrated), a second toxicity judge.

It shares no code, data pipeline or architecture with the BiLSTM or Detoxify, so agreement between it and them
is evidence that a change in toxicity is real and not one classifier's blind spot. Imported on first use: the
package loads scikit-learn (about 1.5 s) and pins exact scikit-learn / joblib versions, so it may be missing.
"""

from __future__ import annotations

import numpy as np

from alignment.scorers.base import LOWER_IS_BETTER, Scorer, package_version


def _predict_prob():
    try:
        from profanity_check import predict_prob
    except ImportError as error:
        raise ImportError(
            "ProfanityCheck needs the PyPI package alt-profanity-check (`pip install alt-profanity-check`; it "
            "pins exact scikit-learn and joblib versions)"
        ) from error
    return predict_prob


class ProfanityCheck(Scorer):
    """Probability that a text is profane/offensive. Lower is better, range [0, 1]."""

    name = "profanity_check"
    better = LOWER_IS_BETTER
    low = 0.0
    high = 1.0

    def settings(self) -> dict:
        return {"package": package_version("alt-profanity-check")}

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        return np.asarray(_predict_prob()(texts), dtype=np.float64)
