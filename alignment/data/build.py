"""Build a training set once and cache it: sentences -> scores -> levels -> tags -> token ids.

The result is a folder under `runs/cache/datasets/<key>/`, keyed by every config that shapes it,
written to a temporary folder and renamed into place at the end, so an interrupted build leaves
nothing half-written for the next run to read. Scores are cached separately (per scorer + text),
so changing a threshold or a task rebuilds in seconds without rescoring.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignment.scorers.cache import ScoreCache, score_with_cache
from alignment.task import Task, resolve_threshold
from alignment.tokenizer import add_control_tokens, load_tokenizer

log = logging.getLogger(__name__)
BUILD_VERSION = 3  # bump when the on-disk layout or the build logic changes


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
        for part in ("tokens", "scores", "offsets"):
            np.save(folder / f"{name}_{part}.npy", getattr(self, part))

    @classmethod
    def load(cls, folder: Path, name: str) -> "Split":
        return cls(*(np.load(folder / f"{name}_{part}.npy") for part in ("tokens", "scores", "offsets")))


def dataset_key(cfg: dict) -> str:
    blob = json.dumps({"version": BUILD_VERSION, **cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_documents(data: DictConfig) -> tuple[list[dict], dict]:
    source = instantiate(data.source)
    sentencizer = instantiate(data.sentences)
    log.info("Reading documents from %s and splitting them into sentences", type(source).__name__)
    start = time.perf_counter()
    documents = list(sentencizer(source()))
    log.info("Read %d documents, %d sentences kept, in %.1f s", len(documents),
             sum(len(d["sentences"]) for d in documents), time.perf_counter() - start)
    if not documents:
        raise ValueError(
            f"The corpus is empty after cleaning and filtering ({sentencizer.stats}). Check data.source "
            f"(does it point at any text?) and loosen data.sentences (e.g. data.sentences.min_words).")
    return documents, dict(sentencizer.stats)


def score_attributes(task: Task, sentences: list[str], documents: list[dict], cache_dir: Path, progress: bool):
    """Scores of every sentence for every attribute. A source that ships scores for an attribute
    (pile-detoxify's Detoxify 'original' scores) is reused when the attribute names it in `precomputed`."""
    scores = {}
    with ScoreCache(cache_dir / "scores.sqlite") as cache:
        _score_into(scores, task, sentences, documents, cache, progress)
    return scores


def _score_into(scores, task, sentences, documents, cache, progress):
    for name, attribute in task.attributes.items():
        key = attribute.precomputed
        if key and all(key in d.get("scores", {}) for d in documents):
            log.info("Reusing the source's '%s' scores for %s", key, name)
            scores[name] = np.concatenate([np.asarray(d["scores"][key], dtype=float) for d in documents])
            continue
        if key:
            log.warning("Not every document ships '%s' scores: scoring %s with %s instead", key, name,
                        attribute.scorer.name)
        log.info("Scoring %d sentences for %s with %s", len(sentences), name, attribute.scorer.name)
        scores[name] = score_with_cache(attribute.scorer, sentences, cache, progress=progress)


@dataclass
class Corpus:
    """The documents' sentences in one flat list, each with its document, and the train/validation split."""

    documents: list[dict]
    sentences: list[str]
    doc_of: np.ndarray   # document index of each sentence
    is_val: np.ndarray   # per document

    @property
    def train_mask(self) -> np.ndarray:
        """Per sentence: in the training split."""
        return ~self.is_val[self.doc_of]

    def members(self) -> list[np.ndarray]:
        """The sentence indices of each document."""
        return np.split(np.arange(len(self.sentences)),
                        np.cumsum([len(d["sentences"]) for d in self.documents])[:-1])


def build(data: DictConfig, task: Task, tagging: bool, filter_threshold, tokenizer_cfg: DictConfig,
          cache_dir: str | Path, progress: bool = True) -> Path:
    """Build (or find in the cache) the dataset; return its folder. The stages: read -> split -> score -> resolve ->
    filter -> encode -> tag -> assemble -> write."""
    cache_dir = Path(cache_dir)
    key_cfg = {name: OmegaConf.to_container(c, resolve=True) for name, c in
               dict(data=data, tokenizer=tokenizer_cfg).items()}
    key_cfg["task"] = task.config
    key_cfg.update(tagging=bool(tagging), filter_threshold=OmegaConf.to_container(filter_threshold, resolve=True)
                   if isinstance(filter_threshold, DictConfig) else filter_threshold)
    folder = cache_dir / "datasets" / dataset_key(key_cfg)
    if (folder / "meta.json").exists():
        log.info("Dataset cache hit: %s", folder)
        return folder

    documents, sentence_stats = read_documents(data)
    rng = np.random.default_rng(int(data.seed))  # the split's draws, then the tags'
    corpus = split(documents, float(data.val_fraction), rng)
    scores = score_attributes(task, corpus.sentences, documents, cache_dir, progress)
    combined = task.combined_misalignment(scores)
    train_mask = corpus.train_mask
    # Quantile thresholds come from the training split only; the task's own threshold in float32, the units of the
    # per-token scores the objectives compare it with.
    task = task.resolve({name: s[train_mask] for name, s in scores.items()}, combined[train_mask].astype(np.float32))
    levels = {name: a.levels(scores[name]) for name, a in task.attributes.items()}
    layout = data.get("layout", "sentence")
    if layout not in ("sentence", "document", "packed"):
        raise ValueError(f"data.layout must be sentence, document or packed, got {layout!r}")
    keep_doc, filtered, resolved_filter = filter_training(corpus, combined, filter_threshold, layout)

    tokenizer = load_tokenizer(**OmegaConf.to_container(tokenizer_cfg, resolve=True),
                               texts=[s for s, m in zip(corpus.sentences, train_mask) if m])
    control_tokens = task.control_tokens if tagging else []
    add_control_tokens(tokenizer, control_tokens)
    # What goes between a document's sentences: a space (a leading space would break Python code: a newline), or
    # data.joiner; study A's "" concatenates its segments as they are, their own whitespace and newlines kept.
    joiner = data.get("joiner")
    if joiner is None:
        joiner = "\n" if data.sentences.get("kind") == "code" else " "
    log.info("Tokenizing %d sentences", len(corpus.sentences))
    ids, spaced = encode(tokenizer, corpus.sentences, joiner=joiner)
    max_tokens = data.get("max_tokens")
    too_long = np.array([max_tokens is not None and len(x) > max_tokens for x in ids], dtype=bool)
    unit_levels = levels if task.placement == "sentence" else _document_levels(task, scores, corpus)
    prefixes = task.tag_prefixes(unit_levels, rng) if tagging and task.tagged else None

    assemble = partial(assemble_split, corpus=corpus, ids=ids, spaced=spaced, scores=combined, layout=layout,
                       placement=task.placement, dropped=too_long | filtered, eos=tokenizer.eos_token_id,
                       token_ids={t: tokenizer.convert_tokens_to_ids(t) for t in control_tokens})
    splits = {"train": assemble(~corpus.is_val & keep_doc, prefixes), "val": assemble(corpus.is_val, prefixes),
              "val_untagged": assemble(corpus.is_val, None)}
    if len(splits["train"]) == 0:
        raise ValueError("No training example is left: every sentence is longer than data.max_tokens "
                         f"({max_tokens}) or was filtered; raise data.max_tokens or lower the filter")

    stats = {
        **{f"sentences/{k}": v for k, v in sentence_stats.items()},
        "documents": len(documents), "sentences": len(corpus.sentences),
        "sentences_too_long": int(too_long.sum()),
        "train_examples": len(splits["train"]), "val_examples": len(splits["val"]),
        "train_tokens": int(len(splits["train"].tokens)), "val_tokens": int(len(splits["val"].tokens)),
        "filtered_documents": int((~keep_doc).sum()),
        "filtered_sentences": int(filtered.sum()),
    }
    for name, a in task.attributes.items():
        for lvl, level_name in enumerate(a.level_names):
            stats[f"level_share/{name}/{level_name}"] = float(np.mean(levels[name][train_mask] == lvl))
    if prefixes is not None:
        stats["untagged_share"] = float(np.mean([len(p) == 0 for p in prefixes]))
    unit_is_train = train_mask if task.placement == "sentence" else ~corpus.is_val
    meta = {
        "key_config": key_cfg, "stats": stats, "control_tokens": control_tokens,
        "thresholds": {name: a.thresholds for name, a in task.attributes.items()},
        "threshold": task.threshold,
        "filter_threshold": resolved_filter,
        "layout": layout,
        # How often each combination of the tagged attributes' levels occurs in training: evaluation draws the
        # tokens a prompt leaves out from it (eval.missing=sample).
        "level_counts": level_counts(task, unit_levels, unit_is_train) if tagging else {},
    }
    val_sentences = [{"text": corpus.sentences[i], **{n: int(levels[n][i]) for n in levels}}
                     for i in np.flatnonzero(~train_mask)]
    write(folder, tokenizer, splits, val_sentences, meta)
    return folder


def split(documents: list[dict], val_fraction: float, rng: np.random.Generator) -> Corpus:
    """Split by document, so that no document's sentences leak from train into validation."""
    is_val = rng.random(len(documents)) < val_fraction
    if is_val.all() or not is_val.any():
        is_val[:] = False
        is_val[rng.integers(len(documents))] = len(documents) > 1
        if not is_val.any():
            raise ValueError("The corpus has a single document: need at least two to hold out a validation split")
    sentences = [s for d in documents for s in d["sentences"]]
    doc_of = np.repeat(np.arange(len(documents)), [len(d["sentences"]) for d in documents])
    return Corpus(documents, sentences, doc_of, is_val)


def filter_training(corpus: Corpus, combined: np.ndarray, threshold, layout: str):
    """Filtering drops training documents whose mean misalignment is above the threshold; in the one-sentence
    layout, where a sentence is the document, it drops sentences. Returns (documents kept, sentences filtered,
    the resolved threshold or None)."""
    keep_doc = np.ones(len(corpus.documents), dtype=bool)
    filtered = np.zeros(len(corpus.sentences), dtype=bool)
    if threshold is None:
        return keep_doc, filtered, None
    train_mask = corpus.train_mask
    resolved = resolve_threshold(threshold, combined[train_mask])
    if layout == "sentence":
        filtered = train_mask & (combined > resolved)
    else:
        keep_doc = corpus.is_val | (_per_document_mean(combined, corpus) <= resolved)
    if not (keep_doc[corpus.doc_of] & ~filtered & train_mask).any():
        raise ValueError(f"filter_threshold={threshold} (= {resolved:.4g}) removes every training "
                         f"document; raise it (e.g. objective.filter_threshold={{quantile: 0.9}})")
    return keep_doc, filtered, resolved


def encode(tokenizer, sentences: list[str], joiner: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each sentence alone (a sequence's first) and after `joiner` (the ones that follow)."""
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    spaced = tokenizer([joiner + s for s in sentences], add_special_tokens=False)["input_ids"]
    return ids, spaced


def assemble_split(doc_mask: np.ndarray, prefixes: list[list[str]] | None, *, corpus: Corpus, ids, spaced,
                   scores: np.ndarray, layout: str, placement: str, dropped: np.ndarray, eos: int,
                   token_ids: dict[str, int]) -> Split:
    """One sequence per sentence (layout sentence, study B) or per document (document / packed, study A) of the
    documents in `doc_mask`: EOS, then for each sentence its control tokens (`prefixes`, per sentence or per
    document by `placement`; None: untagged) and its text, then EOS. Every token, control tokens and EOS included,
    carries the misalignment of its sentence. `dropped` sentences (too long, filtered) are left out."""
    seqs, seq_scores = [], []
    members_of = corpus.members()
    for d in np.flatnonzero(doc_mask):
        members = [i for i in members_of[d] if not dropped[i]]
        for group in ([[i] for i in members] if layout == "sentence" else [members] if members else []):
            toks, sc = [eos], [scores[group[0]]]
            if prefixes and placement == "document":
                toks += [token_ids[t] for t in prefixes[d]]
                sc += [scores[group[0]]] * len(prefixes[d])
            for j, i in enumerate(group):
                prefix = prefixes[i] if prefixes and placement == "sentence" else []
                body = [token_ids[t] for t in prefix] + (ids[i] if j == 0 else spaced[i])
                toks += body
                sc += [scores[i]] * len(body)
            toks.append(eos)
            sc.append(scores[group[-1]])
            seqs.append(toks)
            seq_scores.append(sc)
    if not seqs:
        return Split(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return Split(np.concatenate(seqs).astype(np.int32), np.concatenate(seq_scores).astype(np.float32), offsets)


def write(folder: Path, tokenizer, splits: dict[str, Split], val_sentences: list[dict], meta: dict) -> None:
    """Write into a temporary folder renamed into place at the end: an interrupted build leaves nothing
    half-written for the next run to read."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, data in splits.items():
            data.save(tmp, name)
        with open(tmp / "val_sentences.jsonl", "w") as f:
            for sentence in val_sentences:
                f.write(json.dumps(sentence) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built the same dataset meanwhile: keep theirs
            if not (folder / "meta.json").exists():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def level_counts(task: Task, unit_levels: dict[str, np.ndarray], in_train: np.ndarray) -> dict[str, int]:
    """{"<level of tagged attribute 1>-<level of 2>...": training units with these levels}, e.g. {"0-2": 1234}."""
    if not task.tagged:
        return {}
    keys, counts = np.unique(np.stack([unit_levels[name][in_train] for name in task.tagged], axis=1), axis=0,
                             return_counts=True)
    return {"-".join(str(int(level)) for level in key): int(count) for key, count in zip(keys, counts)}


def _per_document_mean(values: np.ndarray, corpus: Corpus) -> np.ndarray:
    n_docs = len(corpus.documents)
    return (np.bincount(corpus.doc_of, weights=values, minlength=n_docs)
            / np.maximum(np.bincount(corpus.doc_of, minlength=n_docs), 1))


def _document_levels(task: Task, scores, corpus: Corpus) -> dict[str, np.ndarray]:
    """Document placement tags a document by the level of its mean score."""
    return {name: a.levels(_per_document_mean(scores[name], corpus)) for name, a in task.attributes.items()}
