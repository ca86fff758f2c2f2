"""PEP8: pycodestyle violations per character of code, as in Korbak et al. 2023.

pycodestyle runs in memory (no temporary files) with its silent `BaseReport`; `StandardReport` would print every
violation to stdout. All options that change the count are passed explicitly, so a `~/.config/pycodestyle` or a
`setup.cfg` in the working directory cannot change the scores.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from alignment.scorers.base import LOWER_IS_BETTER, Scorer, package_version
from alignment.scorers.parallel import map_in_processes, resolve_processes

# pycodestyle's own defaults (its DEFAULT_IGNORE: checks PEP8 leaves to taste, e.g. W503/W504 line breaks
# around binary operators, which contradict each other).
DEFAULT_IGNORE = ("E121", "E123", "E126", "E226", "E24", "E704", "W503", "W504")
DEFAULT_MAX_LINE_LENGTH = 79


@functools.lru_cache(maxsize=8)
def _options(max_line_length: int, ignore: tuple[str, ...]):
    import pycodestyle

    style = pycodestyle.StyleGuide(quiet=True, max_line_length=max_line_length, max_doc_length=None,
                                   hang_closing=False, indent_size=4, select=(), ignore=ignore)
    return style.options


def count_violations(texts: Sequence[str], max_line_length: int, ignore: tuple[str, ...]) -> list[int]:
    """Number of pycodestyle violations in each code text. Module-level so worker processes can run it."""
    import pycodestyle

    options = _options(max_line_length, ignore)
    counts = []
    for text in texts:
        report = pycodestyle.BaseReport(options)
        checker = pycodestyle.Checker(lines=text.splitlines(keepends=True), options=options, report=report)
        counts.append(checker.check_all())
    return counts


class Pycodestyle(Scorer):
    """pycodestyle violations per character (0 for an empty text). Lower is better; range [0, inf).

    A text that does not tokenize (a truncated sample) is not an error: pycodestyle reports it as E901/E902,
    which counts as one more violation.
    """

    name = "pycodestyle"
    better = LOWER_IS_BETTER
    low = 0.0
    high = float("inf")

    def __init__(self, max_line_length: int = DEFAULT_MAX_LINE_LENGTH, ignore: Sequence[str] = DEFAULT_IGNORE,
                 processes: int | None = None):
        self.max_line_length = int(max_line_length)
        self.ignore = tuple(sorted(ignore))
        self.processes = resolve_processes(processes)

    def settings(self) -> dict:
        return {"max_line_length": self.max_line_length, "ignore": list(self.ignore),
                "package": package_version("pycodestyle")}

    def counts(self, texts: list[str]) -> np.ndarray:
        chunk_counter = functools.partial(count_violations, max_line_length=self.max_line_length,
                                          ignore=self.ignore)
        return np.asarray(map_in_processes(chunk_counter, texts, self.processes), dtype=np.float64)

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        lengths = np.array([len(text) for text in texts], dtype=np.float64)
        return self.counts(texts) / np.maximum(lengths, 1.0)
