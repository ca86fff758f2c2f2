"""What the streaming build keeps on disk between its stages: a work folder of shards that survives a crash.

    datasets/.building-<key>/          the work folder of dataset <key> (kept until the dataset is complete)
        raw/00000/ ...                 pass 1, per chunk of documents: sentences, document lengths, val flags, scores
        raw/done.json                  pass 1 complete: shard count, totals, the sentencizer's statistics
        resolved/                      thresholds, the tag draws' start, the tokenizer (control tokens added)
        tokens/00000/ ...              pass 2, per raw shard: the three splits' token arrays and its val sentences

Every entry is written into a temporary folder and renamed into place, so an entry that exists is complete; an
interrupted build started again keeps them and redoes only what is missing. One process builds a key at a time
(`locked`): a second one (another DDP rank) waits, then finds the dataset built.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_PARTS = ("tokens", "scores", "offsets")
SPLITS = ("train", "val", "val_untagged")


@dataclass
class Split:
    """Token sequences stored flat: example i is tokens[offsets[i]:offsets[i+1]], with one
    misalignment score per token (the score of the sentence the token belongs to)."""

    tokens: np.ndarray   # int32
    scores: np.ndarray   # float32
    offsets: np.ndarray  # int64, len = examples + 1

    def __len__(self):
        return len(self.offsets) - 1

    def save(self, folder: Path, name: str):
        for part in SPLIT_PARTS:
            np.save(folder / f"{name}_{part}.npy", getattr(self, part))

    @classmethod
    def load(cls, folder: Path, name: str, mmap: bool = False) -> "Split":
        """mmap: map the files instead of reading them, so a split larger than memory trains (pages are read
        as batches touch them)."""
        return cls(*(np.load(folder / f"{name}_{part}.npy", mmap_mode="r" if mmap else None)
                     for part in SPLIT_PARTS))


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it when the block ends without an error (removed on one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file beside the work folder); the kernel releases it when its process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class DrawStream:
    """One shard's part of the corpus-wide stream of uniform draws that starts at bit-generator `state`.

    The build's draws are laid out as if one generator drew them for the whole corpus at once (as the in-memory
    build did): first one per document (the validation split), then one block of `block` draws per tag draw
    (one per unit and tag kind). PCG64 makes one 64-bit step per float, so `advance` jumps straight to a shard's
    offset: a shard's draws do not depend on which shards were built before it in this process, on the shard
    size, or on a resumed build skipping shards; the many-shard build equals the one-shard build.
    `random(n)` is duck-typed to `np.random.Generator.random`: call k returns block k's draws at `start`.
    """

    def __init__(self, state: dict, start: int, block: int = 0):
        self.state, self.start, self.block, self.calls = state, start, block, 0

    def random(self, n: int) -> np.ndarray:
        generator = np.random.PCG64()
        generator.state = self.state
        generator.advance(self.calls * self.block + self.start)
        self.calls += 1
        return np.random.Generator(generator).random(n)


class WorkFolder:
    """The shards of one dataset's build (see the module docstring for the layout)."""

    def __init__(self, path: Path):
        self.path = path

    def raw(self, index: int) -> Path:
        return self.path / "raw" / f"{index:05d}"

    def tokens(self, index: int) -> Path:
        return self.path / "tokens" / f"{index:05d}"

    @property
    def resolved(self) -> Path:
        return self.path / "resolved"

    def read_json(self, relative: str) -> dict | None:
        path = self.path / relative
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, relative: str, value: dict) -> None:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(value, indent=2, default=float))
        os.replace(tmp, path)


def write_raw_shard(folder: Path, sentences: list[str], doc_lengths: np.ndarray, is_val: np.ndarray,
                    scores: dict[str, np.ndarray]) -> None:
    with atomic_folder(folder) as tmp:
        with open(tmp / "sentences.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in sentences)
        np.savez(tmp / "arrays.npz", doc_lengths=doc_lengths, is_val=is_val,
                 **{f"score_{name}": values for name, values in scores.items()})


@dataclass
class RawShard:
    doc_lengths: np.ndarray   # sentences per document
    is_val: np.ndarray        # per document: the split's draw (before the whole-corpus fallback)
    scores: dict[str, np.ndarray]
    folder: Path

    @classmethod
    def load(cls, folder: Path) -> "RawShard":
        with np.load(folder / "arrays.npz") as arrays:
            scores = {key.removeprefix("score_"): arrays[key] for key in arrays.files if key.startswith("score_")}
            return cls(arrays["doc_lengths"], arrays["is_val"], scores, folder)

    def sentences(self) -> Iterator[str]:
        with open(self.folder / "sentences.jsonl") as f:
            for line in f:
                yield json.loads(line)

    @property
    def doc_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.doc_lengths)), self.doc_lengths)


def held_out(raw: RawShard, first: int, val_document: int | None) -> np.ndarray:
    """Per document of the shard: in the validation split (its draw, or the corpus-wide fallback)."""
    if val_document is None:
        return raw.is_val
    is_val = np.zeros(len(raw.doc_lengths), dtype=bool)
    if first <= val_document < first + len(is_val):
        is_val[val_document - first] = True
    return is_val


def first_document(corpus: dict, index: int) -> int:
    return sum(s["documents"] for s in corpus["per_shard"][:index])


def concatenate_splits(shards: list[Path], folder: Path) -> dict[str, int]:
    """Each split of the token shards as one .npy file per part (the bytes `np.save` writes for the whole array),
    appended shard by shard with plain writes: one shard in memory at a time, and no mapped pages, which would count
    as the process's memory. The offsets are shifted by the tokens before. Returns each split's examples."""
    examples = {}
    for name in SPLITS:
        # The mapped loads read only the headers: the totals, for the headers written first.
        sizes = [(len(s.tokens), len(s)) for s in (Split.load(shard, name, mmap=True) for shard in shards)]
        n_tokens, n_examples = sum(t for t, _ in sizes), sum(e for _, e in sizes)
        files = {part: open(folder / f"{name}_{part}.npy", "wb") for part in SPLIT_PARTS}
        try:
            for part, dtype, n in (("tokens", np.int32, n_tokens), ("scores", np.float32, n_tokens),
                                   ("offsets", np.int64, n_examples + 1)):
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": (n,)}
                np.lib.format.write_array_header_1_0(files[part], header)
            files["offsets"].write(np.zeros(1, np.int64).tobytes())
            token_at = 0
            for shard in shards:
                split = Split.load(shard, name)
                files["tokens"].write(split.tokens.astype(np.int32).tobytes())
                files["scores"].write(split.scores.astype(np.float32).tobytes())
                files["offsets"].write((split.offsets[1:] + token_at).astype(np.int64).tobytes())
                token_at += len(split.tokens)
        finally:
            for f in files.values():
                f.close()
        examples[name] = n_examples
    return examples


def concatenate_files(sources: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for source in sources:
            with open(source, "rb") as f:
                shutil.copyfileobj(f, out)
