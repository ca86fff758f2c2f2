"""Every source through its real loading code, on data the tests write (or the shipped tweets)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignment import CONF_DIR
from alignment.data.sentences import Sentencizer
from alignment.data.sources import (
    STUDY_B_EXCLUDED_PILE_SETS,
    FilesSource,
    HFSource,
    PileDetoxifySource,
    PythonCodeSource,
    TweetsSource,
)
from tests.conftest import compose_config


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache and lock files in the test's folder, not in the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


# ---------------------------------------------------------------------------------------------
# Tweets (the real shipped file)

def test_tweets_source_reads_every_tweet():
    documents = list(TweetsSource()())
    assert len(documents) == 38_158
    assert documents[1] == {"text": "self-driving cars just seem lazy and a waste of money"}
    assert list(TweetsSource(limit=3)()) == documents[:3]


def test_tweets_pipeline_sentence_count():
    sentencizer = Sentencizer(rule="gentle", min_words=4)
    documents = list(sentencizer(TweetsSource()()))
    # Golden numbers of the current cleaning + splitting rules (conf/data/tweets.yaml: ~47.6k sentences).
    assert sentencizer.stats["documents_in"] == 38_158
    assert sentencizer.stats["sentences_out"] == sum(len(d["sentences"]) for d in documents) == 47_621
    sentences = [s for d in documents for s in d["sentences"]]
    assert len(set(sentences)) == len(sentences)
    assert not any("http" in s or not s.isascii() for s in sentences)
    # The shipped default also collapses runs of mentions (conf/data/tweets.yaml): some sentences fall under 4 words
    # or become duplicates.
    collapsing = Sentencizer(rule="gentle", min_words=4, collapse_mentions=True)
    assert sum(len(d["sentences"]) for d in collapsing(TweetsSource()())) == 47_494
    assert collapsing.stats["dropped_short"] - sentencizer.stats["dropped_short"] == 113


# ---------------------------------------------------------------------------------------------
# Python code

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_python_code_source_skips_tests_site_packages_and_short_files(tmp_path):
    body = "".join(f"x{i} = {i}\n" for i in range(5))
    _write(tmp_path / "b.py", body)
    _write(tmp_path / "a" / "mod.py", "# a\n" + body)
    _write(tmp_path / "short.py", "x = 1\n")
    _write(tmp_path / "tests" / "test_x.py", body)
    _write(tmp_path / "pkg" / "test" / "t.py", body)
    _write(tmp_path / "site-packages" / "lib.py", body)
    _write(tmp_path / "notes.txt", body)
    source = PythonCodeSource(root=str(tmp_path))
    assert source.files() == [tmp_path / "a" / "mod.py", tmp_path / "b.py", tmp_path / "short.py"]
    assert list(source()) == [{"text": "# a\n" + body}, {"text": body}]
    assert list(PythonCodeSource(root=str(tmp_path), min_lines=1)())[-1] == {"text": "x = 1\n"}
    assert list(PythonCodeSource(root=str(tmp_path), limit=1)()) == [{"text": "# a\n" + body}]


def test_python_code_source_defaults_to_the_standard_library():
    source = PythonCodeSource(limit=3)
    documents = list(source())
    assert len(documents) == 3
    names = {path.name for path in source.files()}
    assert {"os.py", "bisect.py", "json"} & names >= {"os.py", "bisect.py"}
    assert not any("test" in path.relative_to(source.root).parts[:-1] for path in source.files())


def test_python_code_source_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        list(PythonCodeSource(root=str(tmp_path / "nope"))())


# ---------------------------------------------------------------------------------------------
# Local files

def test_files_source_txt_jsonl_parquet(tmp_path):
    _write(tmp_path / "b.txt", "First paragraph line one.\nLine two.\n\n\nSecond paragraph.\n")
    _write(tmp_path / "a.jsonl", json.dumps({"body": "From json."}) + "\n\n" + json.dumps({"body": None}) + "\n")
    pq.write_table(pa.table({"body": ["From parquet.", ""], "other": [1, 2]}), tmp_path / "c.parquet")
    source = FilesSource(paths=[str(tmp_path / "*.txt"), str(tmp_path / "*.*")], text_field="body")
    assert [p.name for p in source.files()] == ["b.txt", "a.jsonl", "c.parquet"]  # no file twice
    assert list(source()) == [{"text": "First paragraph line one.\nLine two."}, {"text": "Second paragraph."},
                              {"text": "From json."}, {"text": "From parquet."}]
    assert len(list(FilesSource(str(tmp_path / "**" / "*.txt"), limit=1)())) == 1


def test_files_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        FilesSource(str(tmp_path / "*.jsonl")).files()
    _write(tmp_path / "x.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match="x.jsonl:1 has no field 'text'"):
        list(FilesSource(str(tmp_path / "x.jsonl"))())
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(KeyError, match="no column 'text'"):
        list(FilesSource(str(tmp_path / "x.parquet"))())
    _write(tmp_path / "x.csv", "text\nx\n")
    with pytest.raises(ValueError, match="supported extensions"):
        list(FilesSource(str(tmp_path / "x.csv"))())


# ---------------------------------------------------------------------------------------------
# Hugging Face `datasets` (local files through the real load_dataset, streaming)

def test_hf_source_json_data_files_streaming(tmp_path):
    rows = [{"content": f"Document number {i}.", "n": i} for i in range(5)] + [{"content": "", "n": 5}]
    _write(tmp_path / "part.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    source = HFSource("json", text_column="content", data_files=str(tmp_path / "part.jsonl"), limit=4)
    assert list(source()) == [{"text": f"Document number {i}."} for i in range(4)]
    everything = HFSource("json", text_column="content", data_files=str(tmp_path / "part.jsonl"), streaming=False)
    assert len(list(everything())) == 5  # the empty text is skipped
    with pytest.raises(KeyError, match=r"no column 'text'.*\['content', 'n'\]"):
        list(HFSource("json", data_files=str(tmp_path / "part.jsonl"))())


def test_hf_source_local_dataset_directory(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["Alpha text.", "Beta text."]}), folder / "train-00000.parquet")
    assert list(HFSource(str(folder))()) == [{"text": "Alpha text."}, {"text": "Beta text."}]


def test_hub_unreachable_gives_a_clear_message(monkeypatch):
    # What load_dataset does without network, minus its ~20 s of retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="network access to the hub.*data_files.*FilesSource"):
        list(HFSource("someone/some-dataset")())
    with pytest.raises(ConnectionError, match="HF_DATASETS_OFFLINE.*local copy: a dataset directory"):
        list(PileDetoxifySource()())


def _pile_rows(count: int) -> list[dict]:
    sets = ["Pile-CC", "Github", "OpenWebText2", "ArXiv", "Books3"]
    return [{"texts": [f"Sentence a of document {i}.", f"Sentence b of document {i}."],
             "meta": {"pile_set_name": sets[i % len(sets)]},
             "scores": [i / 1000, i / 100], "avg_score": 0.0, "num_sents": 2} for i in range(count)]


def _pile_dataset_dir(tmp_path: Path, count: int) -> str:
    folder = tmp_path / "pile-detoxify"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(_pile_rows(count)), folder / "train-00000-of-00001.parquet")
    return str(folder)


def test_pile_detoxify_source_keeps_scores_and_drops_excluded_sets(tmp_path):
    name = _pile_dataset_dir(tmp_path, 10)
    documents = list(PileDetoxifySource(name=name, fraction=1.0)())
    # rows 1, 6 (Github) and 3, 8 (ArXiv) are excluded
    kept = [0, 2, 4, 5, 7, 9]
    assert documents == [{"sentences": [f"Sentence a of document {i}.", f"Sentence b of document {i}."],
                          "scores": {"detoxify_original": [i / 1000, i / 100]}} for i in kept]
    assert len(list(PileDetoxifySource(name=name, fraction=1.0, exclude_sources=[])())) == 10
    assert len(list(PileDetoxifySource(name=name, fraction=1.0, limit=2)())) == 2


def test_pile_detoxify_source_sample_is_seeded(tmp_path):
    name = _pile_dataset_dir(tmp_path, 400)

    def sample(seed):
        docs = PileDetoxifySource(name=name, fraction=0.5, seed=seed, exclude_sources=[])()
        return [d["scores"]["detoxify_original"][0] for d in docs]

    first = sample(42)
    assert sample(42) == first
    assert sample(7) != first
    assert 200 - 45 < len(first) < 200 + 45  # Binomial(400, 0.5): mean 200, sd 10
    with pytest.raises(ValueError, match="fraction"):
        PileDetoxifySource(fraction=0.0)


def test_pre_scored_source_reads_chunks_in_order_under_the_given_score_name(tmp_path):
    """Study A's corpora come in chunks: rows are numbered across them (the sample is that of the concatenation)."""
    first, second = tmp_path / "chunk-0", tmp_path / "chunk-1"
    first.mkdir(), second.mkdir()
    rows = _pile_rows(6)
    pq.write_table(pa.Table.from_pylist(rows[:4]), first / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), second / "train.parquet")
    chunks = PileDetoxifySource(name=[str(first), str(second)], fraction=1.0, exclude_sources=[], score_name="pii")()
    assert [d["scores"] for d in chunks] == [{"pii": [i / 1000, i / 100]} for i in range(6)]
    whole = _pile_dataset_dir(tmp_path, 6)

    def kept(name):
        return [d["sentences"] for d in PileDetoxifySource(name=name, fraction=0.5, seed=3, exclude_sources=[])()]

    assert kept([str(first), str(second)]) == kept(whole)
    with pytest.raises(ValueError, match="non-empty list"):
        PileDetoxifySource(name=[])


def test_pile_documents_through_the_sentencizer_keep_scores_aligned(tmp_path):
    rows = [{"texts": ["Too short.", "This sentence has exactly ten words in it, you see.",
                       "Another, rather longer sentence \u2014 with eleven words to keep it in!"],
             "meta": {"pile_set_name": "Pile-CC"}, "scores": [0.9, 0.001, 0.5], "avg_score": 0.0, "num_sents": 3}]
    folder = tmp_path / "pile"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    sentencizer = Sentencizer(rule="strict", min_words=10)
    out = list(sentencizer(PileDetoxifySource(name=str(folder), fraction=1.0)()))
    assert out == [{"sentences": ["This sentence has exactly ten words in it you see.",
                                  "Another rather longer sentence with eleven words to keep it in!"],
                    "scores": {"detoxify_original": [0.001, 0.5]}}]


# ---------------------------------------------------------------------------------------------
# conf/data/*.yaml

DATA_CONFIGS = sorted(p for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "_base")


def _data_config(name: str, tmp_path: Path):
    """conf/data/<name>.yaml as a run composes it (its `_base` defaults included)."""
    return compose_config([f"data={name}"], tmp_path / name).data


def test_data_configs_have_exactly_the_same_keys(tmp_path):
    assert {p.stem for p in DATA_CONFIGS} >= {"tweets", "pile_detoxify", "hf", "files", "python_code"}
    for path in DATA_CONFIGS:
        cfg = _data_config(path.stem, tmp_path)
        keys = ["sentences", "val_fraction", "max_tokens", "seed", "layout", "joiner", "shard_documents", "block_size",
                "source"]
        assert sorted(cfg) == sorted(keys), path.name
        assert cfg.val_fraction == 0.05 and cfg.seed == 42, path.name
        assert cfg.sentences._target_ == "alignment.data.sentences.Sentencizer", path.name
    assert OmegaConf.missing_keys(_data_config("hf", tmp_path)) == {"data.source.name"}
    assert OmegaConf.missing_keys(_data_config("files", tmp_path)) == {"data.source.paths"}


def test_data_configs_instantiate(tmp_path):
    tweets = _data_config("tweets", tmp_path)
    tweets.source.limit = 50
    sentences = instantiate(tweets.sentences)
    assert len(list(sentences(instantiate(tweets.source)()))) > 30

    pile = _data_config("pile_detoxify", tmp_path)
    source = instantiate(pile.source)
    assert (source.fraction, source.seed, source.exclude_sources) == (0.02, 42, frozenset(STUDY_B_EXCLUDED_PILE_SETS))
    assert (instantiate(pile.sentences).rule, instantiate(pile.sentences).min_words) == ("strict", 10)

    files = _data_config("files", tmp_path)
    files.source.paths = str(_write(tmp_path / "x.txt", "Four words right here."))
    assert list(instantiate(files.sentences)(instantiate(files.source)())) == [
        {"sentences": ["Four words right here."], "scores": {}}]

    code = _data_config("python_code", tmp_path)
    code.source.limit = 2
    files = [d["text"] for d in instantiate(code.source)()]
    snippets = [d["sentences"] for d in instantiate(code.sentences)(iter([{"text": text} for text in files]))]
    assert len(snippets) == 2 and all(snippets)
    for text, pieces in zip(files, snippets):
        position = 0
        for piece in pieces:
            # the file's exact lines, in file order, without blank lines around them...
            position = text.index(piece, position) + len(piece)
            lines = piece.splitlines()
            assert lines[0].strip() and lines[-1].strip() and len(piece.split()) >= 4
            # ...at most code_max_lines = 10 of them, unless one block (no blank line inside) is longer
            assert len(lines) <= 10 or all(line.strip() for line in lines), piece


@pytest.mark.slow
def test_hub_unreachable_without_offline_mode(tmp_path):
    """The real thing: a hub that refuses connections (a closed local port, whatever this machine's network),
    online mode; `datasets` retries for ~20 s, then gives up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free now, and nothing listens on it once the socket is closed
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(Path(__file__).parents[1]))
    code = ("from alignment.data.sources import HFSource\n"
            "try:\n    list(HFSource('someone/some-dataset')())\n"
            "except ConnectionError as err:\n    print('ConnectionError:', err)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("ConnectionError: Could not load dataset 'someone/some-dataset' from the Hugging Face hub")
    assert "network access to the hub" in out and "data.source.name=<local dataset directory>" in out


def test_jsonl_with_bad_bytes_and_bad_lines(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"text": "caf\xe9 au lait is tasty"}\n')  # latin-1 byte in a UTF-8 file
    assert list(FilesSource(str(good))()) == [{"text": "caf\ufffd au lait is tasty"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2 is not valid JSON"):
        list(FilesSource(str(bad))())
