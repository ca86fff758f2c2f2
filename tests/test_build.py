"""The dataset build on a small hand-written corpus: exact token sequences, per-token scores,
filtering, layouts, caching, and clear errors that leave nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.utils import instantiate

from alignment.data.build import Split
from alignment.data.sentences import split_sentences
from alignment.task import Task
from tests.conftest import compose_config

POSITIVE = ["I love this wonderful sunny day.", "What a great and happy morning it is.",
            "Thank you so much for the lovely gift."]
NEGATIVE = ["This is a terrible and awful mess.", "I hate waiting in this horrible queue.",
            "The food was disgusting and the service was bad."]
TOXIC = ["You are a stupid worthless idiot.", "Shut up you pathetic moron."]


def write_corpus(folder, n_docs=40):
    """Documents of two sentences each, drawn from the lists above (deterministic)."""
    pool = POSITIVE + NEGATIVE + TOXIC
    lines = []
    for i in range(n_docs):
        a, b = pool[i % len(pool)], pool[(3 * i + 1) % len(pool)]
        lines.append(json.dumps({"text": f"{a} {b} (doc {i} here now)"}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def datamodule(tmp_path, *extra):
    corpus = write_corpus(tmp_path)
    cfg = compose_config([f"data=files", f"data.source.paths={corpus}", "data.sentences.dedupe=false",
                          "data.val_fraction=0.2", "model.tokenizer.kind=gpt2_offline", "task.untagged_fraction=0",
                          "datamodule.progress=false", *extra], tmp_path / "out")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    return cfg, dm


def test_sentence_layout_exact_tokens_and_scores(runs_dir, tmp_path):
    cfg, dm = datamodule(tmp_path)
    tok, meta = dm.tokenizer, dm.meta
    task = Task.from_config(cfg.task)
    for name, thresholds in meta["thresholds"].items():
        task.attributes[name].thresholds = thresholds
    train = Split.load(dm.folder, "train")
    assert len(train) == meta["stats"]["train_examples"] > 0
    eos = tok.eos_token_id
    for i in range(len(train)):
        ids = train.tokens[train.offsets[i]:train.offsets[i + 1]].tolist()
        scores = train.scores[train.offsets[i]:train.offsets[i + 1]]
        assert ids[0] == eos and ids[-1] == eos
        # Recompute this example from its text with the real scorers: EOS, tags in task order, text, EOS.
        text = tok.decode(ids[3:-1])
        levels = {n: int(a.levels(a.scorer.score([text]))[0]) for n, a in task.attributes.items()}
        expected_tags = [task.attributes["toxicity"].tokens[levels["toxicity"]],
                         task.attributes["sentiment"].tokens[levels["sentiment"]]]
        assert ids == [eos] + tok.convert_tokens_to_ids(expected_tags) + tok(text, add_special_tokens=False)["input_ids"] + [eos]
        raw = {n: a.scorer.score([text]) for n, a in task.attributes.items()}
        assert np.allclose(scores, task.combined_misalignment(raw)[0], atol=1e-6)  # every token carries its sentence's score


def test_untagged_objective_has_no_control_tokens(runs_dir, tmp_path):
    _, dm = datamodule(tmp_path, "objective=mle")
    tok = dm.tokenizer
    assert dm.meta["control_tokens"] == []
    train = Split.load(dm.folder, "train")
    assert "<|pos|>" not in tok.get_vocab() or tok.convert_tokens_to_ids("<|pos|>") not in train.tokens


def _document_means(dm, task, split):
    """Mean combined misalignment of each stored document, recomputed from its text with the real scorers."""
    means = []
    for i in range(len(split)):
        text = dm.tokenizer.decode(split.tokens[split.offsets[i]:split.offsets[i + 1]], skip_special_tokens=True)
        sentences = split_sentences(text)
        raw = {n: a.scorer.score(sentences) for n, a in task.attributes.items()}
        means.append(float(task.combined_misalignment(raw).mean()))
    return np.array(means)


def test_filtering_removes_exactly_the_documents_above_threshold(runs_dir, tmp_path):
    cfg, full = datamodule(tmp_path, "objective=mle", "data.layout=document")
    _, filtered = datamodule(tmp_path, "objective=filtering", "task.threshold=0.6", "data.layout=document")
    assert filtered.meta["filter_threshold"] == 0.6
    task = Task.from_config(cfg.task)
    before = _document_means(full, task, Split.load(full.folder, "train"))
    after = _document_means(filtered, task, Split.load(filtered.folder, "train"))
    assert 0 < filtered.meta["stats"]["filtered_documents"] == int((before > 0.6).sum())
    assert len(after) == int((before <= 0.6).sum()) and (after <= 0.6 + 1e-6).all()


def test_filtering_in_the_sentence_layout_drops_sentences(runs_dir, tmp_path):
    _, full = datamodule(tmp_path, "objective=mle")
    _, filtered = datamodule(tmp_path, "objective=filtering", "task.threshold=0.6")
    before, after = Split.load(full.folder, "train"), Split.load(filtered.folder, "train")
    first = lambda split: split.scores[split.offsets[:-1]]  # every token of an example carries its sentence's score
    assert 0 < filtered.meta["stats"]["filtered_sentences"] == int((first(before) > 0.6).sum())
    assert len(after) == int((first(before) <= 0.6).sum()) and (first(after) <= 0.6 + 1e-6).all()
    assert filtered.meta["stats"]["filtered_documents"] == 0


def test_packed_layout_has_eos_only_at_document_starts(runs_dir, tmp_path):
    cfg, dm = datamodule(tmp_path, "data.layout=packed", "data.block_size=16", "task.placement=document")
    dm.setup()
    eos = dm.tokenizer.eos_token_id
    blocks = [dm.train_set[i][0] for i in range(len(dm.train_set))]
    assert all(len(b) == 16 for b in blocks)
    stream = np.concatenate(blocks)
    train = Split.load(dm.folder, "train")
    # one EOS per document (the trailing EOS of each stored sequence is dropped when packing)
    assert (stream == eos).sum() <= len(train) and (stream == eos).sum() >= len(train) - 2
    assert len(stream) == (len(train.tokens) - len(train)) // 16 * 16


def test_rebuild_is_a_cache_hit(runs_dir, tmp_path):
    _, first = datamodule(tmp_path)
    stamp = (first.folder / "meta.json").stat().st_mtime_ns
    _, second = datamodule(tmp_path)
    assert second.folder == first.folder and (second.folder / "meta.json").stat().st_mtime_ns == stamp
    _, other = datamodule(tmp_path, "task.attributes.toxicity.thresholds=[0.3]")
    assert other.folder != first.folder  # a new threshold is a new dataset (scores come from the score cache)


def test_empty_corpus_is_a_clear_error_and_leaves_nothing(runs_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    cfg = compose_config(["data=files", f"data.source.paths={tmp_path / 'empty.jsonl'}", "datamodule.progress=false"],
                         tmp_path / "out")
    before = set((runs_dir / "cache" / "datasets").glob("*")) if (runs_dir / "cache" / "datasets").exists() else set()
    with pytest.raises(ValueError, match="empty after cleaning"):
        instantiate(cfg.datamodule).prepare_data()
    after = set((runs_dir / "cache" / "datasets").glob("*")) if (runs_dir / "cache" / "datasets").exists() else set()
    assert after == before


def test_filter_that_removes_everything_is_a_clear_error(runs_dir, tmp_path):
    with pytest.raises(ValueError, match="removes every training document"):
        datamodule(tmp_path, "objective=filtering", "task.threshold=-1")
