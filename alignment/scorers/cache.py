"""An on-disk score cache, so that a text is scored once per scorer configuration, ever.

One sqlite file, one table: (scorer_key, text_hash) -> score, where scorer_key is `Scorer.cache_key()` (name +
everything that changes the scores) and text_hash the sha1 of the text's utf-8 bytes. `score_with_cache` commits
after every batch, so an interrupted build resumes where it stopped. Two processes (two DDP ranks) may open the
same file: WAL journaling lets readers and one writer work together, and a busy timeout makes writers wait for
each other instead of failing with "database is locked". Inserts ignore rows another process already wrote
(both computed the same deterministic score).
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from alignment.scorers.base import Scorer

# How long a writer waits for another process's transaction to end before giving up.
BUSY_TIMEOUT_SECONDS = 120.0
# sqlite's default limit on "?" parameters in one statement is 999 on older builds.
_LOOKUP_CHUNK = 900


def text_hash(text: str) -> str:
    """sha1 of the utf-8 text (lone surrogates, which utf-8 cannot encode, are passed through as bytes)."""
    return hashlib.sha1(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class ScoreCache:
    """Scores by (scorer key, text hash) in one sqlite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        self.connection.execute("PRAGMA journal_mode=WAL")
        # WAL makes NORMAL durable against process crashes (only an OS crash can lose the last commits).
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS scores (scorer_key TEXT NOT NULL, text_hash TEXT NOT NULL, "
            "score REAL NOT NULL, PRIMARY KEY (scorer_key, text_hash)) WITHOUT ROWID"
        )
        self.connection.commit()

    def lookup(self, scorer_key: str, hashes: Sequence[str]) -> dict[str, float]:
        """The cached scores among `hashes` (missing ones are simply absent from the result)."""
        found: dict[str, float] = {}
        hashes = list(hashes)
        for start in range(0, len(hashes), _LOOKUP_CHUNK):
            chunk = hashes[start:start + _LOOKUP_CHUNK]
            placeholders = ",".join("?" * len(chunk))
            rows = self.connection.execute(
                f"SELECT text_hash, score FROM scores WHERE scorer_key = ? AND text_hash IN ({placeholders})",
                [scorer_key, *chunk],
            )
            found.update(rows)
        return found

    def store(self, scorer_key: str, hash_scores: Iterable[tuple[str, float]]) -> None:
        """Insert scores and commit, so that they survive an interruption right after."""
        with self.connection:  # one transaction, committed on exit
            self.connection.executemany(
                "INSERT OR IGNORE INTO scores (scorer_key, text_hash, score) VALUES (?, ?, ?)",
                [(scorer_key, digest, float(score)) for digest, score in hash_scores],
            )

    def count(self, scorer_key: str | None = None) -> int:
        """Number of cached scores (for one scorer key, or all)."""
        if scorer_key is None:
            return self.connection.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        return self.connection.execute("SELECT COUNT(*) FROM scores WHERE scorer_key = ?",
                                       (scorer_key,)).fetchone()[0]

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "ScoreCache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def score_with_cache(scorer: Scorer, texts: list[str], cache: ScoreCache | None, batch_size: int = 1024,
                     progress: bool = False) -> np.ndarray:
    """`scorer.score(texts)`, computing only what `cache` does not hold yet.

    Duplicate texts are scored once. Missing texts are scored in batches of `batch_size`, and each batch is
    committed before the next starts. With `cache=None` this is just deduplicated, batched scoring.
    Returns float64, one score per text, in the order of `texts`.
    """
    texts = list(texts)
    hashes = [text_hash(text) for text in texts]
    unique_texts = dict(zip(hashes, texts))  # hash -> text, first occurrence order
    key = scorer.cache_key()
    scores = cache.lookup(key, list(unique_texts)) if cache is not None else {}
    missing = [digest for digest in unique_texts if digest not in scores]

    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"scoring with {scorer.name}", unit="text")
    try:
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            batch_scores = np.asarray(scorer.score([unique_texts[digest] for digest in batch]), dtype=np.float64)
            if batch_scores.shape != (len(batch),):
                raise ValueError(f"{scorer.name} returned {batch_scores.shape} scores for {len(batch)} texts")
            if np.isnan(batch_scores).any():
                raise ValueError(f"{scorer.name} returned NaN scores")
            if cache is not None:
                cache.store(key, zip(batch, batch_scores))
            scores.update(zip(batch, batch_scores.tolist()))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return np.array([scores[digest] for digest in hashes], dtype=np.float64)
