"""The dataset build on a small hand-written corpus: exact token sequences, per-token scores,
filtering, layouts, caching, and clear errors that leave nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.utils import instantiate

from alignment.data.assemble import Corpus, document_levels
from alignment.data.sentences import split_sentences
from alignment.data.shards import Split
from alignment.task import Task
from tests.conftest import compose_config

# Known sentences and the tags their scores give (BiLSTM toxic above 0.2; VADER compound below -0.05 negative,
# above 0.05 positive), written out so that a moved threshold or a swapped token fails: every level occurs.
KNOWN = {
    "I love this wonderful sunny day.": ("<|nontoxic|>", "<|pos|>"),                # 0.010, +0.908
    "Thank you so much for the lovely gift.": ("<|nontoxic|>", "<|pos|>"),          # 0.005, +0.848
    "The train leaves the station at nine.": ("<|nontoxic|>", "<|neu|>"),           # 0.012, 0
    "The meeting is on the third floor.": ("<|nontoxic|>", "<|neu|>"),              # 0.018, 0
    "The rain ruined our picnic today.": ("<|nontoxic|>", "<|neg|>"),               # 0.019, -0.477
    "Sadly the shop was closed again.": ("<|nontoxic|>", "<|neg|>"),                # 0.013, -0.421
    "This is a terrible and awful mess.": ("<|toxic|>", "<|neg|>"),                 # 0.487, -0.823
    "The food was disgusting and the service was bad.": ("<|toxic|>", "<|neg|>"),   # 0.527, -0.784
    "You are a stupid worthless idiot.": ("<|toxic|>", "<|neg|>"),                  # 0.996, -0.863
    "You are a wonderful and lovely idiot.": ("<|toxic|>", "<|pos|>"),              # 0.982, +0.637
}
DOC_MARK = ("<|nontoxic|>", "<|neu|>")  # "(doc 7 here now)": BiLSTM 0.03-0.07, VADER 0


def write_corpus(folder, n_docs=40):
    """Documents of two known sentences each and a numbered third one (deterministic)."""
    pool = list(KNOWN)
    lines = []
    for i in range(n_docs):
        a, b = pool[i % len(pool)], pool[(3 * i + 1) % len(pool)]
        lines.append(json.dumps({"text": f"{a} {b} (doc {i} here now)"}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def datamodule(tmp_path, *extra):
    corpus = write_corpus(tmp_path)
    cfg = compose_config(["data=files", f"data.source.paths={corpus}", "data.sentences.dedupe=false",
                          "data.val_fraction=0.2", "model.tokenizer.kind=gpt2_offline", "task.untagged_fraction=0",
                          "datamodule.progress=false", *extra], tmp_path / "out")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    return cfg, dm


def test_sentence_layout_exact_tokens_and_scores(runs_dir, tmp_path):
    cfg, dm = datamodule(tmp_path)
    tok, meta = dm.tokenizer, dm.meta
    assert meta["thresholds"] == {"toxicity": [0.2], "sentiment": [-0.05, 0.05]}
    task = Task.from_config(cfg.task)
    seen = set()
    eos = tok.eos_token_id
    for name in ("train", "val"):
        split = Split.load(dm.folder, name)
        assert len(split) == meta["stats"][f"{name}_examples"] > 0
        for i in range(len(split)):
            ids = split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist()
            scores = split.scores[split.offsets[i]:split.offsets[i + 1]]
            # EOS, the two tags written out above (toxicity first), the text, EOS.
            text = tok.decode(ids[3:-1])
            tags = KNOWN[text] if text in KNOWN else DOC_MARK if text.startswith("(doc ") else None
            assert tags is not None, text
            seen.add(text)
            body = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == [eos] + tok.convert_tokens_to_ids(list(tags)) + body + [eos]
            raw = {n: a.scorer.score([text]) for n, a in task.attributes.items()}
            assert np.allclose(scores, task.combined_misalignment(raw)[0], atol=1e-6)  # each token: its sentence
    assert set(KNOWN) <= seen


def test_document_placement_tags_a_document_by_its_mean_scores(runs_dir, tmp_path):
    """One prefix per document, from the mean of its sentences' scores, not from any one sentence."""
    documents = {
        # toxicity mean 0.174 (one sentence at 0.982), sentiment mean +0.319
        "You are a wonderful and lovely idiot. The train leaves the station at nine. The meeting is on the third "
        "floor. Thank you so much for the lovely gift. I love this wonderful sunny day. The rain ruined our picnic "
        "today.": ("<|nontoxic|>", "<|pos|>"),
        # toxicity mean 0.50, sentiment mean (0.848 - 0.863) / 2 = -0.008: neutral though neither sentence is
        "Thank you so much for the lovely gift. You are a stupid worthless idiot.": ("<|toxic|>", "<|neu|>"),
        "The train leaves the station at nine. The meeting is on the third floor.": ("<|nontoxic|>", "<|neu|>"),
        "This is a terrible and awful mess. Sadly the shop was closed again.": ("<|toxic|>", "<|neg|>"),  # 0.25
        "The rain ruined our picnic today. Sadly the shop was closed again.": ("<|nontoxic|>", "<|neg|>"),
    }
    corpus = tmp_path / "documents.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    cfg = compose_config(["data=files", f"data.source.paths={corpus}", "data.sentences.dedupe=false",
                          "data.layout=document", "task.placement=document", "model.tokenizer.kind=gpt2_offline",
                          "task.untagged_fraction=0", "datamodule.progress=false"], tmp_path / "out")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    tok, eos = dm.tokenizer, dm.tokenizer.eos_token_id
    found = {}
    for name in ("train", "val"):
        split = Split.load(dm.folder, name)
        for i in range(len(split)):
            ids = split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist()
            assert ids[0] == eos and ids[-1] == eos
            found[tok.decode(ids[3:-1])] = tuple(tok.convert_ids_to_tokens(ids[1:3]))
    assert found == documents
    # Untagged documents carry no control token at all.
    untagged = Split.load(dm.folder, "val_untagged")
    assert not np.isin(untagged.tokens, tok.convert_tokens_to_ids(dm.meta["control_tokens"])).any()


def test_document_levels_are_the_levels_of_the_mean_score(runs_dir, tmp_path):
    task = Task.from_config(compose_config(["task=toxsen"], tmp_path / "out").task)
    # documents 0 and 1 hold two sentences each, document 2 one, document 3 none
    doc_of = np.array([0, 0, 1, 1, 2])
    scores = {"toxicity": np.array([0.1, 0.25, 0.0, 0.5, 0.9]), "sentiment": np.array([0.9, -0.9, 0.5, 0.3, -0.5])}
    corpus = Corpus(["s"] * 5, np.array([2, 2, 1, 0]), np.zeros(4, dtype=bool))
    assert corpus.doc_of.tolist() == doc_of.tolist()
    levels = document_levels(task, scores, corpus)
    # toxicity means 0.175, 0.25, 0.9, 0 against 0.2; sentiment means 0, 0.4, -0.5, 0 against -0.05 / 0.05
    assert levels["toxicity"].tolist() == [0, 1, 1, 0]
    assert levels["sentiment"].tolist() == [1, 2, 0, 1]


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


def test_a_build_interrupted_while_writing_leaves_no_dataset_and_the_next_one_completes(runs_dir, tmp_path,
                                                                                       monkeypatch):
    """Ctrl-C while pass 2 writes its token shard: no dataset folder, no temporary folder, only the work folder
    with its finished raw shard; the next build completes from it and removes it."""
    datasets_dir = runs_dir / "cache" / "datasets"
    before = set(datasets_dir.glob("*")) | set(datasets_dir.glob(".*"))
    real_save = Split.save

    def save_then_interrupt(split, folder, name):
        real_save(split, folder, name)
        if name == "val":
            raise KeyboardInterrupt

    monkeypatch.setattr(Split, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        datamodule(tmp_path, "data.seed=7")  # a dataset no other test builds
    left = (set(datasets_dir.glob("*")) | set(datasets_dir.glob(".*"))) - before
    work = next(path for path in left if path.is_dir())
    assert work.name.startswith(".building-") and {p.name for p in left} == {work.name, f"{work.name}.lock"}
    assert (work / "raw" / "00000" / "sentences.jsonl").exists() and (work / "resolved" / "tokenizer").is_dir()
    assert list((work / "tokens").iterdir()) == []  # the interrupted shard's temporary folder went
    monkeypatch.setattr(Split, "save", real_save)
    _, dm = datamodule(tmp_path, "data.seed=7")
    assert dm.folder.name == work.name.removeprefix(".building-") and len(Split.load(dm.folder, "val_untagged")) > 0
    assert set(datasets_dir.glob("*")) | set(datasets_dir.glob(".*")) == before | {dm.folder}


def test_filter_that_removes_everything_is_a_clear_error(runs_dir, tmp_path):
    with pytest.raises(ValueError, match="removes every training document"):
        datamodule(tmp_path, "objective=filtering", "task.threshold=-1")


def test_study_a_packed_text_keeps_each_documents_segments_as_they_were(runs_dir, tmp_path):
    """experiment=korbak_*'s data settings (raw, min_words 0, joiner ""): a document decodes to its segments
    concatenated, whitespace, newlines and blank segments included; the default joins by a space and drops blanks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [["Hello there.  ", "\n", "Second  line\there.\n", "   "], ["One more\n\n", "and the end."]] * 5
    rows = [{"texts": t, "scores": [0.0001] * len(t), "meta": {"pile_set_name": "Pile-CC"}} for t in texts]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "train.parquet")
    common = ["data=pile_detoxify", f"data.source.name={corpus}", "data.source.fraction=1.0", "objective=mle",
              "+data.source.exclude_sources=[]", "data.sentences.rule=raw", "data.sentences.dedupe=false",
              "data.max_tokens=null", "data.val_fraction=0.3", "model.tokenizer.kind=gpt2_offline", "task=toxicity",
              "data.layout=packed", "data.block_size=8",
              "task.attributes.toxicity.precomputed=detoxify_original", "datamodule.progress=false"]

    def documents(*extra):
        cfg = compose_config(common + list(extra), tmp_path / "out")
        dm = instantiate(cfg.datamodule)
        dm.prepare_data()
        eos, decoded = dm.tokenizer.eos_token_id, []
        for name in ("train", "val"):
            split = Split.load(dm.folder, name)
            for i in range(len(split)):
                ids = split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist()
                assert ids[0] == ids[-1] == eos and eos not in ids[1:-1]
                decoded.append(dm.tokenizer.decode(ids[1:-1]))
        return sorted(decoded)

    assert documents("data.sentences.min_words=0", "+data.joiner=''") == \
        sorted(["Hello there.  \nSecond  line\there.\n   ", "One more\n\nand the end."] * 5)
    assert documents("data.sentences.min_words=1") == \
        sorted(["Hello there.   Second  line\there.\n", "One more\n\n and the end."] * 5)
