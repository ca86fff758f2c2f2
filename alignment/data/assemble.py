"""The build's pass 2 and its end: per raw shard levels -> filter -> tag -> encode -> assemble into a token shard;
then the token shards concatenated into the dataset folder (one file per split and part) with its meta.json."""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignment.data.shards import (
    DrawStream,
    RawShard,
    Split,
    WorkFolder,
    atomic_folder,
    concatenate_files,
    concatenate_splits,
    first_document,
    held_out,
)
from alignment.task import Task

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """One shard's sentences in one flat list, its documents' lengths and its train/validation split."""

    sentences: list[str]
    doc_lengths: np.ndarray  # sentences per document
    is_val: np.ndarray       # per document

    @property
    def doc_of(self) -> np.ndarray:
        """Document index of each sentence."""
        return np.repeat(np.arange(len(self.doc_lengths)), self.doc_lengths)

    @property
    def train_mask(self) -> np.ndarray:
        """Per sentence: in the training split."""
        return ~self.is_val[self.doc_of]

    def members(self) -> list[np.ndarray]:
        """The sentence indices of each document."""
        return np.split(np.arange(len(self.sentences)), np.cumsum(self.doc_lengths)[:-1])


def tag_and_encode(work: WorkFolder, index: int, totals: dict, plan, resolved) -> dict:
    """Pass 2 on raw shard `index`: levels -> filter -> tag -> encode -> assemble, written as its token shard (once:
    a resumed build keeps it). Returns the shard's counts, which the dataset's statistics add up."""
    folder = work.tokens(index)
    if folder.exists():
        log.info("Token shard %d: kept from an interrupted build", index)
        return json.loads((folder / "counts.json").read_text())
    raw = RawShard.load(work.raw(index))
    corpus = Corpus(list(raw.sentences()), raw.doc_lengths,
                    held_out(raw, first_document(totals, index), resolved.val_document))
    task, tokenizer, scores = resolved.task, resolved.tokenizer, raw.scores
    combined = task.combined_misalignment(scores)
    levels = {name: a.levels(scores[name]) for name, a in task.attributes.items()}
    keep_doc, filtered = filter_training(corpus, combined, resolved.filter_threshold, plan.layout)
    unit_levels = levels if task.placement == "sentence" else document_levels(task, scores, corpus)
    prefixes = tag(unit_levels, index, totals, plan, resolved)
    ids, spaced = encode(tokenizer, corpus.sentences, joiner=plan.joiner)
    too_long = np.array([plan.max_tokens is not None and len(x) > plan.max_tokens for x in ids], dtype=bool)
    assemble = dict(corpus=corpus, ids=ids, spaced=spaced, scores=combined, layout=plan.layout,
                    placement=task.placement, dropped=too_long | filtered, eos=tokenizer.eos_token_id,
                    token_ids={t: tokenizer.convert_tokens_to_ids(t) for t in plan.control_tokens})
    splits = {"train": assemble_split(~corpus.is_val & keep_doc, prefixes, **assemble),
              "val": assemble_split(corpus.is_val, prefixes, **assemble),
              "val_untagged": assemble_split(corpus.is_val, None, **assemble)}
    train = corpus.train_mask
    counts = {
        "sentences_too_long": int(too_long.sum()), "filtered_documents": int((~keep_doc).sum()),
        "filtered_sentences": int(filtered.sum()), "train_sentences": int(train.sum()),
        "levels": {name: np.bincount(levels[name][train], minlength=len(a.tokens)).tolist()
                   for name, a in task.attributes.items()},
        "units": len(next(iter(unit_levels.values()))),
        "untagged": None if prefixes is None else sum(len(p) == 0 for p in prefixes),
        "level_counts": level_counts(task, unit_levels, train if task.placement == "sentence" else ~corpus.is_val)
        if plan.tagging else {},
        **{f"{name}_tokens": len(split.tokens) for name, split in splits.items()},
    }
    val_sentences = [{"text": corpus.sentences[i], **{n: int(levels[n][i]) for n in levels}}
                     for i in np.flatnonzero(~train)]
    write_token_shard(folder, splits, val_sentences, counts)
    return counts


def tag(unit_levels: dict[str, np.ndarray], index: int, totals: dict, plan, resolved) -> list[list[str]] | None:
    """The control tokens of each unit (sentence or document) of shard `index`, None when the objective does not
    tag. The draws that drop tags are this shard's units' part of the corpus-wide stream (see DrawStream)."""
    task = resolved.task
    if not (plan.tagging and task.tagged):
        return None
    if task.placement == "sentence":
        before, units = sum(s["sentences"] for s in totals["per_shard"][:index]), totals["sentences"]
    else:
        before, units = first_document(totals, index), totals["documents"]
    return task.tag_prefixes(unit_levels, DrawStream(resolved.tag_draws, before, block=units))


def write_token_shard(folder: Path, splits: dict[str, Split], val_sentences: list[dict], counts: dict) -> None:
    with atomic_folder(folder) as tmp:
        for name, split in splits.items():
            split.save(tmp, name)
        with open(tmp / "val_sentences.jsonl", "w") as f:
            f.writelines(json.dumps(sentence) + "\n" for sentence in val_sentences)
        (tmp / "counts.json").write_text(json.dumps(counts))


def filter_training(corpus: Corpus, combined: np.ndarray, threshold: float | None, layout: str):
    """Filtering drops training documents whose mean misalignment is above the (resolved) threshold; in the
    one-sentence layout, where a sentence is the document, it drops sentences. Returns (documents kept, sentences
    filtered)."""
    keep_doc = np.ones(len(corpus.doc_lengths), dtype=bool)
    filtered = np.zeros(len(corpus.sentences), dtype=bool)
    if threshold is None:
        return keep_doc, filtered
    if layout == "sentence":
        filtered = corpus.train_mask & (combined > threshold)
    else:
        keep_doc = corpus.is_val | (per_document_mean(combined, corpus.doc_of, len(corpus.doc_lengths)) <= threshold)
    return keep_doc, filtered


def encode(tokenizer, sentences: list[str], joiner: str, batch: int = 4096) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each sentence alone (a sequence's first) and after `joiner` (the ones that follow). In batches:
    a fast tokenizer's output keeps every token's string and offsets too, several times the ids' memory."""
    ids, spaced = [], []
    for start in range(0, len(sentences), batch):
        texts = sentences[start:start + batch]
        ids += tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        spaced += tokenizer([joiner + s for s in texts], add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
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


def write_dataset(work: WorkFolder, folder: Path, corpus_totals: dict, plan, resolved, shard_counts: list[dict],
                  key_cfg: dict) -> None:
    """The dataset folder from the token shards, renamed into place once complete."""
    task, n_shards = resolved.task, corpus_totals["shards"]
    shards = [work.tokens(i) for i in range(n_shards)]
    total = Counter()
    for counts in shard_counts:
        total.update({k: v for k, v in counts.items() if isinstance(v, int)})
    with atomic_folder(folder) as tmp:
        examples = concatenate_splits(shards, tmp)
        if examples["train"] == 0:
            raise ValueError("No training example is left: every sentence is longer than data.max_tokens "
                             f"({plan.max_tokens}) or was filtered; raise data.max_tokens or lower the filter")
        concatenate_files([shard / "val_sentences.jsonl" for shard in shards], tmp / "val_sentences.jsonl")
        shutil.copytree(work.resolved / "tokenizer", tmp / "tokenizer")
        stats = {
            **{f"sentences/{k}": v for k, v in corpus_totals["sentence_stats"].items()},
            "documents": corpus_totals["documents"], "sentences": corpus_totals["sentences"],
            "sentences_too_long": total["sentences_too_long"],
            "train_examples": examples["train"], "val_examples": examples["val"],
            "train_tokens": total["train_tokens"], "val_tokens": total["val_tokens"],
            "filtered_documents": total["filtered_documents"], "filtered_sentences": total["filtered_sentences"],
        }
        for name, a in task.attributes.items():
            per_level = np.sum([counts["levels"][name] for counts in shard_counts], axis=0)
            for lvl, level_name in enumerate(a.level_names):
                stats[f"level_share/{name}/{level_name}"] = float(per_level[lvl] / total["train_sentences"])
        if shard_counts[0]["untagged"] is not None:
            stats["untagged_share"] = float(total["untagged"] / total["units"])
        combos = Counter()
        for counts in shard_counts:
            combos.update(counts["level_counts"])
        meta = {
            "key_config": key_cfg, "stats": stats, "control_tokens": plan.control_tokens,
            "thresholds": {name: a.thresholds for name, a in task.attributes.items()},
            "threshold": task.threshold,
            "filter_threshold": resolved.filter_threshold,
            "layout": plan.layout,
            # How often each combination of the tagged attributes' levels occurs in training: evaluation draws the
            # tokens a prompt leaves out from it (eval.missing=sample).
            "level_counts": dict(sorted(combos.items(), key=lambda kv: [int(x) for x in kv[0].split("-")])),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=float))


def level_counts(task: Task, unit_levels: dict[str, np.ndarray], in_train: np.ndarray) -> dict[str, int]:
    """{"<level of tagged attribute 1>-<level of 2>...": training units with these levels}, e.g. {"0-2": 1234}."""
    if not task.tagged or not in_train.any():
        return {}
    keys, counts = np.unique(np.stack([unit_levels[name][in_train] for name in task.tagged], axis=1), axis=0,
                             return_counts=True)
    return {"-".join(str(int(level)) for level in key): int(count) for key, count in zip(keys, counts)}


def per_document_mean(values: np.ndarray, doc_of: np.ndarray, n_docs: int) -> np.ndarray:
    return np.bincount(doc_of, weights=values, minlength=n_docs) / np.maximum(np.bincount(doc_of, minlength=n_docs), 1)


def document_levels(task: Task, scores, corpus: Corpus) -> dict[str, np.ndarray]:
    """Document placement tags a document by the level of its mean score."""
    n_docs = len(corpus.doc_lengths)
    return {name: a.levels(per_document_mean(scores[name], corpus.doc_of, n_docs))
            for name, a in task.attributes.items()}
