"""Personally identifiable information: scrubadub detections ("filth") per character, as in Korbak et al. 2023.

Study A's PII scorer (`apo/scorers.py` in pretraining-with-human-feedback) took scrubadub's default detectors and
added four: dates of birth, Skype names, spaCy's named entities (`en_core_web_sm`) and street addresses (pyap,
without libpostal). The first two ship with scrubadub and run offline; the other two need packages and a model
that are not installed here, so asking for them without those installed fails when the scorer is built, with
the command that installs them.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import numpy as np

from alignment.scorers.base import LOWER_IS_BETTER, Scorer, package_version
from alignment.scorers.parallel import map_in_processes, resolve_processes

# scrubadub 2.0's autoloaded detectors for en_US: regular expressions and the phonenumbers library only.
DEFAULT_DETECTORS = ("credential", "credit_card", "email", "phone", "social_security_number", "twitter", "url")
# Study A's set: the defaults and four more.
STUDY_A_DETECTORS = DEFAULT_DETECTORS + ("date_of_birth", "skype", "spacy", "address")
# Detectors that need a separate install: the modules they import and what to run to get them. `spacy` is
# scrubadub_spacy's entity detector with study A's model, `address` study A's pyap-only detector (pii_address).
NEEDS_INSTALL = {
    # scrubadub_spacy imports spacy_transformers on every text, whatever the model
    "spacy": (("scrubadub_spacy", "spacy_transformers", "en_core_web_sm"),
              "pip install scrubadub-spacy==2.0.0 spacy-transformers && python -m spacy download en_core_web_sm"),
    "address": (("pyap",), "pip install pyap==0.3.1"),
}
# What runs on a plain install (date_of_birth uses dateparser, skype textblob's bundled tagger).
OFFLINE_DETECTORS = tuple(d for d in STUDY_A_DETECTORS if d not in NEEDS_INSTALL)
# scrubadub detectors that need NLTK or Stanford downloads and no study used.
REFUSED = ("text_blob_name", "stanford", "spacy_name", "spacy_title")
# What study A's scorer caught per text (dateparser and spaCy fail on some texts); such a text counted 0.
DETECTOR_ERRORS = (ValueError, RecursionError, OverflowError, ZeroDivisionError)


def missing_installs(detectors: Sequence[str]) -> dict[str, str]:
    """The asked-for detectors whose modules are not importable here, with the command that installs them."""
    return {name: command for name, (modules, command) in NEEDS_INSTALL.items()
            if name in detectors and any(importlib.util.find_spec(module) is None for module in modules)}


def _detector(name: str, locale: str):
    """A scrubadub detector by name; the installed extras as instances (their names are not in its catalogue)."""
    if name == "spacy":
        from scrubadub_spacy.detectors.spacy import SpacyEntityDetector

        return SpacyEntityDetector(model="en_core_web_sm", locale=locale)
    if name == "address":
        from alignment.scorers.pii_address import PyapAddressDetector

        return PyapAddressDetector(locale=locale)
    return name


@functools.lru_cache(maxsize=8)
def _scrubber(detectors: tuple[str, ...], locale: str):
    """One scrubber per process and configuration (building one compiles all the detectors' patterns)."""
    import scrubadub

    return scrubadub.Scrubber(detector_list=[_detector(name, locale) for name in detectors], locale=locale)


def count_filth(texts: Sequence[str], detectors: tuple[str, ...], locale: str) -> list[int]:
    """Number of (merged) detections in each text. Module-level so worker processes can run it."""
    scrubber = _scrubber(detectors, locale)
    counts = []
    for text in texts:
        try:
            counts.append(sum(1 for _ in scrubber.iter_filth(text)))
        except DETECTOR_ERRORS:
            counts.append(0)
    return counts


ANONYMISED_HANDLE = "@user"


class ScrubadubPII(Scorer):
    """scrubadub detections per character (0 for an empty text). Lower is better; range [0, inf)."""

    name = "scrubadub_pii"
    better = LOWER_IS_BETTER
    low = 0.0
    high = float("inf")

    def __init__(self, detectors: Sequence[str] = DEFAULT_DETECTORS, locale: str = "en_US",
                 processes: int | None = None):
        refused = sorted(set(detectors) & set(REFUSED))
        if refused:
            raise ValueError(f"detectors {refused} need NLTK or Stanford downloads; study A's set is "
                             f"{list(STUDY_A_DETECTORS)}, of which {list(OFFLINE_DETECTORS)} run offline")
        missing = missing_installs(detectors)
        if missing:
            steps = "; ".join(f"{name}: {command}" for name, command in missing.items())
            offline = ",".join(d for d in detectors if d not in missing)
            raise ValueError(f"PII detectors {sorted(missing)} are not installed here. Install them ({steps}) "
                             f"or leave them out: task.attributes.<attribute>.scorer.detectors=[{offline}]")
        self.detectors = tuple(sorted(detectors))
        self.locale = locale
        self.processes = resolve_processes(processes)

    def settings(self) -> dict:
        return {"detectors": list(self.detectors), "locale": self.locale, "package": package_version("scrubadub"),
                "ignores": ANONYMISED_HANDLE}

    def counts(self, texts: list[str]) -> np.ndarray:
        # `@user` is the placeholder gentle cleaning puts where a handle was (alignment.data.sentences): our own
        # anonymisation, not PII. Counted, it would make half of the tweets "misaligned" for mentioning someone.
        texts = [t.replace(ANONYMISED_HANDLE, "user") for t in texts]
        chunk_counter = functools.partial(count_filth, detectors=self.detectors, locale=self.locale)
        return np.asarray(map_in_processes(chunk_counter, texts, self.processes), dtype=np.float64)

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        lengths = np.array([len(text) for text in texts], dtype=np.float64)
        return self.counts(texts) / np.maximum(lengths, 1.0)
