"""Build a training set once and cache it: sentences -> scores -> levels -> tags -> token ids.

The result is a folder under `runs/cache/datasets/<key>/`, keyed by every config that shapes it. The build streams:
the corpus flows through in shards of `data.shard_documents` documents, each stage writing its shards into a work
folder (`shards.py`), so memory does not grow with the corpus and a build killed half-way continues where it
stopped when started again. The dataset folder appears, renamed into place, only once complete. Scores are cached
separately (per scorer + text), so changing a threshold or a task rebuilds in seconds without rescoring.

What memory still grows with: the dedupe set (an 8-byte hash per sentence, ~60 bytes in a Python set: `Sentencizer`),
and the training scores the quantile thresholds are taken from, capped at QUANTILE_SAMPLE per attribute (exact below
it, an evenly spaced sample of them above).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from alignment.data.assemble import per_document_mean, tag_and_encode, write_dataset
from alignment.data.shards import (
    DrawStream,
    RawShard,
    Split,
    WorkFolder,
    atomic_folder,
    first_document,
    held_out,
    locked,
    write_raw_shard,
)
from alignment.scorers.cache import ScoreCache, score_with_cache
from alignment.task import Task, resolve_threshold
from alignment.tokenizer import add_control_tokens, load_tokenizer

log = logging.getLogger(__name__)
# Bump when the on-disk layout or what the build writes changes. (Still 3: the streaming build writes, byte for byte,
# what the in-memory build of version 3 wrote, so the datasets already cached stay valid.)
BUILD_VERSION = 3
QUANTILE_SAMPLE = 4_000_000  # training scores per attribute that quantile thresholds are taken from, at most
__all__ = ["Split", "build", "dataset_key"]


def dataset_key(cfg: dict) -> str:
    blob = json.dumps({"version": BUILD_VERSION, **cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(data: DictConfig, task: Task, tagging: bool, filter_threshold, tokenizer_cfg: DictConfig,
          cache_dir: str | Path, progress: bool = True) -> Path:
    """Build (or find in the cache) the dataset; return its folder. Pass 1 reads -> cleans/splits -> splits by
    document -> scores, shard by shard; resolve takes the thresholds and trains the tokenizer; pass 2 levels ->
    filters -> tags -> encodes -> assembles, shard by shard; the splits are then written one file each."""
    cache_dir = Path(cache_dir)
    key_cfg, shard_documents = dataset_config(data, task, tagging, filter_threshold, tokenizer_cfg)
    folder = cache_dir / "datasets" / dataset_key(key_cfg)
    if (folder / "meta.json").exists():
        log.info("Dataset cache hit: %s", folder)
        return folder
    work = WorkFolder(folder.with_name(f".building-{folder.name}"))
    lock = folder.with_name(f".building-{folder.name}.lock")
    with locked(lock):
        if (folder / "meta.json").exists():  # another process built it while this one waited
            return folder
        try:
            start_over_if_resharded(work, shard_documents)
            plan = Plan.of(data, task, tagging)
            totals = read_and_score(data, task, work, shard_documents, cache_dir, progress)
            resolved = resolve(work, totals, plan, filter_threshold, tokenizer_cfg, seed=int(data.seed))
            counts = [tag_and_encode(work, index, totals, plan, resolved) for index in range(totals["shards"])]
            write_dataset(work, folder, totals, plan, resolved, counts, key_cfg)
        except ValueError:  # a corpus or a setting this build cannot use: started again, it would fail the same way
            shutil.rmtree(work.path, ignore_errors=True)
            lock.unlink()
            raise
        # Anything else (a crash, Ctrl-C, a full disk) keeps the work folder: the next build continues from it.
        shutil.rmtree(work.path)
        lock.unlink()
    return folder


def dataset_config(data: DictConfig, task: Task, tagging: bool, filter_threshold, tokenizer_cfg: DictConfig):
    """Everything that shapes the dataset (its cache key), and the shard size (None: one shard), which does not:
    one shard or many give the same bytes."""
    key_cfg = {name: OmegaConf.to_container(c, resolve=True) for name, c in
               dict(data=data, tokenizer=tokenizer_cfg).items()}
    shard_documents = key_cfg["data"].pop("shard_documents", None)
    key_cfg["task"] = task.config
    key_cfg.update(tagging=bool(tagging), filter_threshold=OmegaConf.to_container(filter_threshold, resolve=True)
                   if isinstance(filter_threshold, DictConfig) else filter_threshold)
    return key_cfg, shard_documents


@dataclass
class Plan:
    """The settings that pass 2 applies to every shard."""

    task: Task
    tagging: bool
    layout: str
    joiner: str
    max_tokens: int | None

    @classmethod
    def of(cls, data: DictConfig, task: Task, tagging: bool) -> "Plan":
        layout = data.get("layout", "sentence")
        if layout not in ("sentence", "document", "packed"):
            raise ValueError(f"data.layout must be sentence, document or packed, got {layout!r}")
        # What goes between a document's sentences: a space (a leading space would break Python code: a newline),
        # or data.joiner; study A's "" concatenates its segments as they are, their own whitespace and newlines kept.
        joiner = data.get("joiner")
        if joiner is None:
            joiner = "\n" if data.sentences.get("kind") == "code" else " "
        return cls(task, bool(tagging), layout, joiner, data.get("max_tokens"))

    @property
    def control_tokens(self) -> list[str]:
        return self.task.control_tokens if self.tagging else []


def start_over_if_resharded(work: WorkFolder, shard_documents: int | None) -> None:
    """Shards of an interrupted build are kept only if cut at the same size."""
    before = work.read_json("plan.json")
    if before is not None and before["shard_documents"] != shard_documents:
        log.info("Discarding the interrupted build in %s: it was cut in shards of another size", work.path)
        shutil.rmtree(work.path)
    work.write_json("plan.json", {"shard_documents": shard_documents})


# ----------------------------------------------------------------------------------------------
# Pass 1: read -> clean/split -> split by document -> score, one raw shard per chunk of documents

def read_and_score(data: DictConfig, task: Task, work: WorkFolder, shard_documents: int | None, cache_dir: Path,
                   progress: bool) -> dict:
    """Write the raw shards; return the corpus's totals. A resumed build reads and cleans the corpus again (a source
    cannot seek, and dedupe must see every earlier sentence) but keeps, unscored, every shard already written."""
    done = work.read_json("raw/done.json")
    if done is not None:
        return done
    source, sentencizer = instantiate(data.source), instantiate(data.sentences)
    log.info("Reading documents from %s in shards of %s documents", type(source).__name__, shard_documents or "all")
    start, shards = time.perf_counter(), []
    split_draws = np.random.PCG64(int(data.seed)).state
    documents = sentencizer(source())
    with ScoreCache(cache_dir / "scores.sqlite") as cache:
        while chunk := list(itertools.islice(documents, shard_documents)):
            index, first_document = len(shards), sum(s["documents"] for s in shards)
            sentences = [s for d in chunk for s in d["sentences"]]
            shards.append({"documents": len(chunk), "sentences": len(sentences)})
            if work.raw(index).exists():
                log.info("Raw shard %d: kept from an interrupted build", index)
                continue
            # Split by document, so that no document's sentences leak from train into validation.
            is_val = DrawStream(split_draws, first_document).random(len(chunk)) < float(data.val_fraction)
            scores = score(task, sentences, chunk, cache, progress)
            write_raw_shard(work.raw(index), sentences, np.array([len(d["sentences"]) for d in chunk]), is_val,
                            scores)
            log.info("Raw shard %d: %d documents, %d sentences", index, len(chunk), len(sentences))
    if not shards:
        raise ValueError(
            f"The corpus is empty after cleaning and filtering ({sentencizer.stats}). Check data.source "
            f"(does it point at any text?) and loosen data.sentences (e.g. data.sentences.min_words).")
    totals = {"shards": len(shards), "per_shard": shards, "documents": sum(s["documents"] for s in shards),
              "sentences": sum(s["sentences"] for s in shards), "sentence_stats": dict(sentencizer.stats)}
    log.info("Read %d documents, %d sentences kept, in %.1f s", totals["documents"], totals["sentences"],
             time.perf_counter() - start)
    work.write_json("raw/done.json", totals)
    return totals


def score(task: Task, sentences: list[str], documents: list[dict], cache: ScoreCache, progress: bool):
    """Scores of every sentence for every attribute. A source that ships scores for an attribute (pile-detoxify's
    Detoxify 'original' scores) is reused when the attribute names it in `precomputed` (decided per shard)."""
    scores = {}
    for name, attribute in task.attributes.items():
        key = attribute.precomputed
        if key and all(key in d.get("scores", {}) for d in documents):
            scores[name] = np.concatenate([np.asarray(d["scores"][key], dtype=float) for d in documents])
            continue
        if key:
            log.warning("Not every document ships '%s' scores: scoring %s with %s instead", key, name,
                        attribute.scorer.name)
        scores[name] = score_with_cache(attribute.scorer, sentences, cache, progress=progress)
    return scores


# ----------------------------------------------------------------------------------------------
# Resolve: quantile thresholds from the training scores, the tokenizer from the training sentences

@dataclass
class Resolved:
    task: Task                     # thresholds resolved
    filter_threshold: float | None
    val_document: int | None       # the corpus-wide fallback when the draws held out no document or all of them
    tag_draws: dict                # the bit-generator state the tag draws start from
    tokenizer: object


def resolve(work: WorkFolder, totals: dict, plan: Plan, filter_threshold, tokenizer_cfg: DictConfig,
            seed: int) -> Resolved:
    saved = work.read_json("resolved/resolved.json")
    if saved is None:
        with atomic_folder(work.resolved) as tmp:
            saved = resolve_from_shards(work, totals, plan, filter_threshold, tokenizer_cfg, seed, tmp)
            (tmp / "resolved.json").write_text(json.dumps(saved, indent=2))
    task = plan.task
    attributes = {name: replace(a, thresholds=saved["thresholds"][name]) for name, a in task.attributes.items()}
    tokenizer = AutoTokenizer.from_pretrained(work.resolved / "tokenizer")
    return Resolved(replace(task, attributes=attributes, threshold=saved["threshold"]), saved["filter_threshold"],
                    saved["val_document"], saved["tag_draws"], tokenizer)


def resolve_from_shards(work: WorkFolder, totals: dict, plan: Plan, filter_threshold, tokenizer_cfg: DictConfig,
                        seed: int, out: Path) -> dict:
    """Thresholds, the split's fallback and the tokenizer (saved into `out`), as JSON."""
    val_document, tag_draws = split_fallback(work, totals, seed)
    samples, lowest = training_scores(work, totals, plan, val_document)
    # The task's own threshold in float32, the units of the per-token scores the objectives compare it with.
    task = plan.task.resolve(samples, samples["combined"].astype(np.float32))
    threshold = None if filter_threshold is None else resolve_threshold(filter_threshold, samples["combined"])
    if threshold is not None and not lowest <= threshold:
        raise ValueError(f"filter_threshold={filter_threshold} (= {threshold:.4g}) removes every training "
                         f"document; raise it (e.g. objective.filter_threshold={{quantile: 0.9}})")
    tokenizer = load_tokenizer(**OmegaConf.to_container(tokenizer_cfg, resolve=True),
                               texts=training_sentences(work, totals, val_document))
    add_control_tokens(tokenizer, plan.control_tokens)
    tokenizer.save_pretrained(out / "tokenizer")
    return {"thresholds": {name: a.thresholds for name, a in task.attributes.items()}, "threshold": task.threshold,
            "filter_threshold": threshold, "val_document": val_document, "tag_draws": tag_draws}


def split_fallback(work: WorkFolder, totals: dict, seed: int) -> tuple[int | None, dict]:
    """When the split's draws held out no document or all of them: the one document held out instead, drawn after
    the split's draws (as the in-memory build did). And the bit-generator state the tag draws start from."""
    n_docs, generator = totals["documents"], np.random.PCG64(seed).advance(totals["documents"])
    flags = [RawShard.load(work.raw(i)).is_val for i in range(totals["shards"])]
    if any(f.any() for f in flags) and not all(f.all() for f in flags):
        return None, generator.state
    if n_docs == 1:
        raise ValueError("The corpus has a single document: need at least two to hold out a validation split")
    return int(np.random.Generator(generator).integers(n_docs)), generator.state


def training_scores(work: WorkFolder, totals: dict, plan: Plan, val_document: int | None):
    """The training sentences' scores per attribute and combined (all of them, or a systematic sample of
    QUANTILE_SAMPLE), and the lowest misalignment a filter sees (`lowest_kept`)."""
    task = plan.task
    # Two reads of the shards, one at a time: the sample's spacing needs the number of training sentences first.
    n_train = sum(int((~is_val[raw.doc_of]).sum()) for raw, is_val in train_shards(work, totals, val_document))
    samples, lowest, taken = {name: [] for name in [*task.attributes, "combined"]}, np.inf, 0
    for raw, is_val in train_shards(work, totals, val_document):
        combined = task.combined_misalignment(raw.scores)
        train = ~is_val[raw.doc_of]
        keep = systematic_sample(np.arange(taken, taken + int(train.sum())), n_train, QUANTILE_SAMPLE)
        taken += int(train.sum())
        for name, values in [*raw.scores.items(), ("combined", combined)]:
            samples[name].append(values[train][keep])
        lowest = min(lowest, lowest_kept(raw, is_val, combined, plan.layout))
    return {name: np.concatenate(parts) for name, parts in samples.items()}, lowest


def systematic_sample(index: np.ndarray, total: int, size: int) -> np.ndarray:
    """Which of the items numbered `index` (out of `total`) an evenly spaced sample of `size` takes: all of them
    when total <= size, so thresholds are exact below QUANTILE_SAMPLE training sentences."""
    if total <= size:
        return np.ones(len(index), dtype=bool)
    return index * size // total != (index + 1) * size // total


def lowest_kept(raw: RawShard, is_val: np.ndarray, combined: np.ndarray, layout: str) -> float:
    """The lowest misalignment a filter sees in this shard: a training sentence's, or (whole documents) a training
    document's mean; a filter threshold below it in every shard removes every training document."""
    if layout == "sentence":
        values = combined[~is_val[raw.doc_of]]
    else:
        values = per_document_mean(combined, raw.doc_of, len(raw.doc_lengths))[~is_val]
    return float(values.min()) if len(values) else np.inf


def train_shards(work: WorkFolder, totals: dict, val_document: int | None):
    """Per raw shard (one in memory at a time): the shard and its documents' validation flags."""
    for index in range(totals["shards"]):
        raw = RawShard.load(work.raw(index))
        yield raw, held_out(raw, first_document(totals, index), val_document)


def training_sentences(work: WorkFolder, totals: dict, val_document: int | None):
    """The training sentences, read shard by shard (the tokenizer trains on them as a stream)."""
    for index in range(totals["shards"]):
        raw = RawShard.load(work.raw(index))
        train = ~held_out(raw, first_document(totals, index), val_document)[raw.doc_of]
        yield from (s for s, keep in zip(raw.sentences(), train) if keep)
