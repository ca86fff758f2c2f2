"""The streaming build: shards do not change the dataset, it equals what the in-memory build wrote, a build killed
with SIGKILL continues from its finished shards, and a split packs without being loaded."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from alignment.data.build import systematic_sample
from alignment.data.datamodule import PackedDataset
from alignment.data.shards import SPLIT_PARTS, SPLITS, DrawStream, Split
from tests.conftest import compose_config
from tests.test_build import write_corpus

ROOT = Path(__file__).resolve().parents[1]
FILES = [f"{split}_{part}.npy" for split in SPLITS for part in SPLIT_PARTS]
# What the in-memory build (commit 43738e4, before the build streamed) wrote for these configs on write_corpus's 60
# documents: the fingerprint of its split files, val sentences, tokenizer and meta's values (`fingerprint`).
IN_MEMORY_BUILD = {
    "sentence": ([], "9ae65ed738ce5f43"),
    "document": (["data.layout=document", "task.placement=document"], "2857c8d63bbd745d"),
    "packed, filtered": (["data.layout=packed", "objective=filtering", "task.threshold={quantile: 0.8}"],
                         "9709c79c4c234a4f"),
}


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in [*FILES, "val_sentences.jsonl", "tokenizer/tokenizer.json"]:
        digest.update((folder / name).read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    digest.update(json.dumps({key: meta[key] for key in ("stats", "thresholds", "threshold", "filter_threshold",
                                                         "level_counts", "control_tokens")}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def common_overrides(tmp_path: Path) -> list[str]:
    corpus = write_corpus(tmp_path, n_docs=60)  # dedupe on: the repeated sentences are dropped across shards too
    return ["data=files", f"data.source.paths={corpus}", "data.val_fraction=0.2", "task.untagged_fraction=0.3",
            "datamodule.progress=false"]


@pytest.mark.parametrize("name", list(IN_MEMORY_BUILD))
def test_many_shards_one_shard_and_the_in_memory_build_write_the_same_bytes(runs_dir, tmp_path, name):
    extra, expected = IN_MEMORY_BUILD[name]
    folders = []
    for shard_documents in (1000, 7):  # one shard; nine (60 documents in, 7 per shard)
        cache = tmp_path / f"cache{shard_documents}"
        if folders:  # the same scores, without scoring again
            cache.mkdir()
            shutil.copy(folders[0].parents[1] / "scores.sqlite", cache / "scores.sqlite")
        cfg = compose_config([*common_overrides(tmp_path), *extra, f"data.shard_documents={shard_documents}",
                              f"paths.cache_dir={cache}"], tmp_path / "out")
        dm = instantiate(cfg.datamodule)
        dm.prepare_data()
        folders.append(dm.folder)
    assert folders[0].name == folders[1].name  # the shard size is not part of the dataset's key
    for part in FILES:
        assert (folders[0] / part).read_bytes() == (folders[1] / part).read_bytes(), part
    assert fingerprint(folders[0]) == fingerprint(folders[1]) == expected


def test_draw_stream_cuts_one_generators_draws_at_any_offset():
    state = np.random.PCG64(42).state
    whole = np.random.default_rng(42).random(30)  # 10 documents' draws, then two blocks of 10 units' draws
    assert np.array_equal(DrawStream(state, 4).random(3), whole[4:7])
    after_split = np.random.PCG64(42).advance(10).state
    shard = DrawStream(after_split, start=6, block=10)
    assert np.array_equal(shard.random(4), whole[16:20]) and np.array_equal(shard.random(4), whole[26:30])


def test_systematic_sample_takes_evenly_spaced_items_whatever_the_shards():
    # 10 items, 4 taken: item i when floor(4i / 10) steps up before i + 1, i.e. items 2, 4, 7 and 9.
    assert np.flatnonzero(systematic_sample(np.arange(10), 10, 4)).tolist() == [2, 4, 7, 9]
    pieces = [systematic_sample(np.arange(a, b), 10, 4) for a, b in ((0, 3), (3, 8), (8, 10))]
    assert np.concatenate(pieces).tolist() == systematic_sample(np.arange(10), 10, 4).tolist()
    assert systematic_sample(np.arange(5), 5, 5).all()  # no more than the sample: every one, exact quantiles


def test_packed_dataset_equals_the_materialised_stream(tmp_path):
    """Blocks read through the offsets equal the old way: every sequence's trailing EOS masked out, then cut."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, size=40)
    tokens = rng.integers(1, 50, size=lengths.sum()).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    Split(tokens, rng.random(len(tokens)).astype(np.float32), offsets).save(tmp_path, "train")
    split = Split.load(tmp_path, "train", mmap=True)
    keep = np.ones(len(tokens), dtype=bool)
    keep[offsets[1:] - 1] = False
    stream, scores = split.tokens[keep], split.scores[keep]
    packed = PackedDataset(split, block_size=8)
    assert len(packed) == keep.sum() // 8 > 10
    for i in range(len(packed)):
        block_tokens, block_scores = packed[i]
        assert np.array_equal(block_tokens, stream[i * 8:(i + 1) * 8])
        assert np.array_equal(block_scores, scores[i * 8:(i + 1) * 8])


# A build in its own process that kills itself with SIGKILL right after writing shard `after` of `stage` ("raw":
# pass 1, "tokens": pass 2; "none": runs to the end). The kill is a real SIGKILL at a chosen point, so the test
# does not race the build.
CHILD = """
import logging, os, signal, sys
from hydra.utils import instantiate
import alignment.data.build as build
from tests.conftest import compose_config

logging.basicConfig(level=logging.INFO, format="%(message)s")
stage, after, out, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

def killing(stage_function, shard_of):
    def run(*args, **kwargs):
        result = stage_function(*args, **kwargs)
        if shard_of(args) == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return run

if stage == "raw":
    build.write_raw_shard = killing(build.write_raw_shard, lambda args: int(args[0].name))
elif stage == "tokens":
    build.tag_and_encode = killing(build.tag_and_encode, lambda args: args[1])
dm = instantiate(compose_config(overrides, __import__("pathlib").Path(out)).datamodule)
dm.prepare_data()
print("DATASET", dm.folder)
"""


def build_in_child(stage: str, after: int, overrides: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, stage, str(after), str(out), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_a_build_killed_twice_continues_from_its_shards_and_equals_an_uninterrupted_one(runs_dir, tmp_path):
    overrides = [*common_overrides(tmp_path), "data.shard_documents=7", "task=sen",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    killed = build_in_child("raw", 3, overrides, tmp_path / "out")  # pass 1 dies after its 4th raw shard
    assert killed.returncode == -9, killed.stderr
    [work] = [path for path in (tmp_path / "cache" / "datasets").glob(".building-*") if path.is_dir()]
    assert sorted(p.name for p in (work / "raw").iterdir()) == ["00000", "00001", "00002", "00003"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (work / "raw").iterdir()}

    killed = build_in_child("tokens", 5, overrides, tmp_path / "out")  # pass 2 dies after its 6th token shard
    assert killed.returncode == -9, killed.stderr
    assert all((work / "raw" / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    for index in range(9):
        kept = f"Raw shard {index}: kept from an interrupted build" in killed.stderr
        assert kept == (index <= 3), (index, killed.stderr)
    assert sorted(p.name for p in (work / "tokens").iterdir()) == [f"0000{i}" for i in range(6)]

    resumed = build_in_child("none", 0, overrides, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert "Raw shard" not in resumed.stderr  # pass 1 had finished: the corpus is not read again
    for index in range(9):
        kept = f"Token shard {index}: kept from an interrupted build" in resumed.stderr
        assert kept == (index <= 5), (index, resumed.stderr)
    folder = Path(resumed.stdout.split("DATASET ")[1].strip())
    assert not work.exists() and not work.with_name(f"{work.name}.lock").exists()

    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    shutil.copy(tmp_path / "cache" / "scores.sqlite", uninterrupted / "scores.sqlite")
    cfg = compose_config([*overrides[:-1], f"paths.cache_dir={uninterrupted}"], tmp_path / "out")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    assert dm.folder.name == folder.name and fingerprint(dm.folder) == fingerprint(folder)
    for part in [*FILES, "val_sentences.jsonl"]:
        assert (dm.folder / part).read_bytes() == (folder / part).read_bytes(), part
