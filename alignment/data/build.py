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
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignment.scorers.cache import ScoreCache, score_with_cache
from alignment.task import Task, resolve_threshold
from alignment.tokenizer import add_control_tokens, load_tokenizer

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # bump when the on-disk layout or the build logic changes


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


def build(data: DictConfig, task_cfg: DictConfig, tagging: bool, filter_threshold, tokenizer_cfg: DictConfig,
          cache_dir: str | Path, progress: bool = True) -> Path:
    """Build (or find in the cache) the dataset; return its folder."""
    cache_dir = Path(cache_dir)
    key_cfg = {name: OmegaConf.to_container(c, resolve=True) for name, c in
               dict(data=data, task=task_cfg, tokenizer=tokenizer_cfg).items()}
    key_cfg.update(tagging=bool(tagging), filter_threshold=OmegaConf.to_container(filter_threshold, resolve=True)
                   if isinstance(filter_threshold, DictConfig) else filter_threshold)
    folder = cache_dir / "datasets" / dataset_key(key_cfg)
    if (folder / "meta.json").exists():
        log.info("Dataset cache hit: %s", folder)
        return folder

    task = Task.from_config(task_cfg)
    documents, sentence_stats = read_documents(data)
    rng = np.random.default_rng(int(data.seed))
    # Split by document so that no document's sentences leak from train into validation.
    is_val = rng.random(len(documents)) < float(data.val_fraction)
    if is_val.all() or not is_val.any():
        is_val[:] = False
        is_val[rng.integers(len(documents))] = len(documents) > 1
        if not is_val.any():
            raise ValueError("The corpus has a single document: need at least two to hold out a validation split")

    sentences = [s for d in documents for s in d["sentences"]]
    doc_of = np.repeat(np.arange(len(documents)), [len(d["sentences"]) for d in documents])
    scores = score_attributes(task, sentences, documents, cache_dir, progress)
    train_mask = ~is_val[doc_of]
    for name, attribute in task.attributes.items():
        attribute.resolve(scores[name][train_mask])  # quantile thresholds come from the training split only
    levels = {name: a.levels(scores[name]) for name, a in task.attributes.items()}
    combined = task.combined_misalignment(scores)

    layout = data.get("layout", "sentence")
    if layout not in ("sentence", "document", "packed"):
        raise ValueError(f"data.layout must be sentence, document or packed, got {layout!r}")
    # Filtering drops training documents whose mean misalignment is above the threshold; in the
    # one-sentence layout, where a sentence is the document, it drops sentences.
    keep_doc = np.ones(len(documents), dtype=bool)
    filtered = np.zeros(len(sentences), dtype=bool)
    resolved_filter = None
    if filter_threshold is not None:
        resolved_filter = resolve_threshold(filter_threshold, combined[train_mask])
        if layout == "sentence":
            filtered = train_mask & (combined > resolved_filter)
        else:
            doc_mean = (np.bincount(doc_of, weights=combined, minlength=len(documents))
                        / np.bincount(doc_of, minlength=len(documents)))
            keep_doc = is_val | (doc_mean <= resolved_filter)
        if not (keep_doc[doc_of] & ~filtered & train_mask).any():
            raise ValueError(f"filter_threshold={filter_threshold} (= {resolved_filter:.4g}) removes every training "
                             f"document; raise it (e.g. objective.filter_threshold={{quantile: 0.9}})")

    tokenizer = load_tokenizer(**OmegaConf.to_container(tokenizer_cfg, resolve=True),
                               texts=[s for s, m in zip(sentences, train_mask) if m])
    control_tokens = task.control_tokens if tagging else []
    add_control_tokens(tokenizer, control_tokens)
    log.info("Tokenizing %d sentences", len(sentences))
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    joiner = "\n" if data.sentences.get("kind") == "code" else " "  # a leading space would break Python code
    spaced = tokenizer([joiner + s for s in sentences], add_special_tokens=False)["input_ids"]
    token_id = {t: tokenizer.convert_tokens_to_ids(t) for t in control_tokens}
    eos = tokenizer.eos_token_id

    max_tokens = data.get("max_tokens")
    too_long = np.array([max_tokens is not None and len(x) > max_tokens for x in ids])
    unit_levels = levels if task.placement == "sentence" else _document_levels(task, scores, doc_of, len(documents))
    prefixes = task.tag_prefixes(unit_levels, rng) if tagging and task.tagged else None

    def assemble(doc_mask: np.ndarray, tagged: bool) -> Split:
        """One sequence per sentence (layout sentence, study B) or per document (document / packed,
        study A): EOS, then for each sentence its control tokens and its text, then EOS. Every token,
        control tokens and EOS included, carries the misalignment of its sentence."""
        sentences_of = np.split(np.arange(len(sentences)), np.cumsum([len(d["sentences"]) for d in documents])[:-1])
        seqs, seq_scores = [], []
        for d in np.flatnonzero(doc_mask):
            members = [i for i in sentences_of[d] if not (too_long[i] or filtered[i])]
            for group in ([[i] for i in members] if layout == "sentence" else [members] if members else []):
                toks, sc = [eos], [combined[group[0]]]
                if tagged and prefixes and task.placement == "document":
                    toks += [token_id[t] for t in prefixes[d]]
                    sc += [combined[group[0]]] * len(prefixes[d])
                for j, i in enumerate(group):
                    prefix = prefixes[i] if tagged and prefixes and task.placement == "sentence" else []
                    body = [token_id[t] for t in prefix] + (ids[i] if j == 0 else spaced[i])
                    toks += body
                    sc += [combined[i]] * len(body)
                toks.append(eos)
                sc.append(combined[group[-1]])
                seqs.append(toks)
                seq_scores.append(sc)
        if not seqs:
            return Split(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64))
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        return Split(np.concatenate(seqs).astype(np.int32), np.concatenate(seq_scores).astype(np.float32), offsets)

    train = assemble(~is_val & keep_doc, tagged=True)
    val = assemble(is_val, tagged=True)
    val_untagged = assemble(is_val, tagged=False)
    if len(train) == 0:
        raise ValueError("No training example is left: every sentence is longer than data.max_tokens "
                         f"({max_tokens}) or was filtered; raise data.max_tokens or lower the filter")

    stats = {
        **{f"sentences/{k}": v for k, v in sentence_stats.items()},
        "documents": len(documents), "sentences": len(sentences),
        "sentences_too_long": int(too_long.sum()),
        "train_examples": len(train), "val_examples": len(val),
        "train_tokens": int(len(train.tokens)), "val_tokens": int(len(val.tokens)),
        "filtered_documents": int((~keep_doc).sum()),
        "filtered_sentences": int(filtered.sum()),
    }
    for name, a in task.attributes.items():
        for lvl, level_name in enumerate(a.level_names):
            stats[f"level_share/{name}/{level_name}"] = float(np.mean(levels[name][train_mask] == lvl))
    if prefixes is not None:
        stats["untagged_share"] = float(np.mean([len(p) == 0 for p in prefixes]))
    unit_is_train = train_mask if task.placement == "sentence" else ~is_val

    meta = {
        "key_config": key_cfg, "stats": stats, "control_tokens": control_tokens,
        "thresholds": {name: a.thresholds for name, a in task.attributes.items()},
        "filter_threshold": resolved_filter,
        "layout": layout,
        # How often each combination of the tagged attributes' levels occurs in training: evaluation draws the
        # tokens a prompt leaves out from it (eval.missing=sample).
        "level_counts": level_counts(task, unit_levels, unit_is_train) if tagging else {},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        train.save(tmp, "train")
        val.save(tmp, "val")
        val_untagged.save(tmp, "val_untagged")
        np.save(tmp / "train_sentence_misalignment.npy", combined[train_mask].astype(np.float32))
        with open(tmp / "val_sentences.jsonl", "w") as f:
            for i in np.flatnonzero(~train_mask):
                f.write(json.dumps({"text": sentences[i], **{n: int(levels[n][i]) for n in levels}}) + "\n")
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
    return folder


def level_counts(task: Task, unit_levels: dict[str, np.ndarray], in_train: np.ndarray) -> dict[str, int]:
    """{"<level of tagged attribute 1>-<level of 2>...": training units with these levels}, e.g. {"0-2": 1234}."""
    if not task.tagged:
        return {}
    keys, counts = np.unique(np.stack([unit_levels[name][in_train] for name in task.tagged], axis=1), axis=0,
                             return_counts=True)
    return {"-".join(str(int(level)) for level in key): int(count) for key, count in zip(keys, counts)}


def _document_levels(task: Task, scores, doc_of, n_docs) -> dict[str, np.ndarray]:
    """Document placement tags a document by the level of its mean score."""
    counts = np.bincount(doc_of, minlength=n_docs)
    return {name: a.levels(np.bincount(doc_of, weights=scores[name], minlength=n_docs) / np.maximum(counts, 1))
            for name, a in task.attributes.items()}
