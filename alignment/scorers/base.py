"""The interface every scorer implements, and the one mapping from scores to misalignment.

A scorer reports numbers in its own units (a probability, a VADER compound in [-1, 1], PII detections per
character...). Code that needs a common scale (thresholds, "share misaligned", the reward of AWR) goes through
`misalignment()`, which maps every scorer onto [0, 1] with 1 = worst.
"""

from __future__ import annotations

import json
import math
from importlib import metadata

import numpy as np

LOWER_IS_BETTER = "lower"
HIGHER_IS_BETTER = "higher"


class Scorer:
    """Texts in, one float64 per text out.

    Subclasses set `name`, `better` ("lower" or "higher": which end of the scale is aligned), `low` and `high`
    (the range of possible scores; `high` may be `inf`), and implement `settings()` and `score()`.
    """

    name: str = "scorer"
    better: str = LOWER_IS_BETTER
    low: float = 0.0
    high: float = 1.0

    def settings(self) -> dict:
        """Everything that changes the scores (model variant, label, rule, package version).

        Options that only change speed (batch size, threads, device) stay out, so that they share cached scores.
        """
        return {}

    def cache_key(self) -> str:
        """A stable string naming exactly this scorer and its settings, e.g. `vader:{"rule":"compound",...}`."""
        settings = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"), default=str)
        return f"{self.name}:{settings}"

    def score(self, texts: list[str]) -> np.ndarray:
        """One score per text (float64), in the scorer's own units."""
        raise NotImplementedError

    def misalignment(self, scores: np.ndarray) -> np.ndarray:
        """Map scores onto [0, 1], 1 = worst.

        - finite range, better="lower": (s - low) / (high - low); for a [0, 1] probability that is the identity.
        - finite range, better="higher": (high - s) / (high - low); VADER compound 1 -> 0, -1 -> 1.
        - infinite `high` (counts per character), better="lower": s - low clipped to [0, 1]. Such rates are
          tiny in practice (PII ~0.01 per character), so the score itself is the misalignment, as in Korbak et
          al. 2023, and the clip only guards degenerate texts (a 3-character text with one detection).
        """
        scores = np.asarray(scores, dtype=np.float64)
        if math.isinf(self.high):
            if self.better != LOWER_IS_BETTER:
                raise NotImplementedError(f"{self.name}: an unbounded scale where higher is better has no worst end")
            return np.clip(scores - self.low, 0.0, 1.0)
        span = self.high - self.low
        if self.better == LOWER_IS_BETTER:
            return np.clip((scores - self.low) / span, 0.0, 1.0)
        if self.better == HIGHER_IS_BETTER:
            return np.clip((self.high - scores) / span, 0.0, 1.0)
        raise ValueError(f"{self.name}: better must be 'lower' or 'higher', not {self.better!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache_key()})"


def package_version(distribution: str) -> str:
    """Installed version of a distribution (part of `settings()`: a new release may score differently)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
