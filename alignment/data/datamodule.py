"""The LightningDataModule: builds (or loads from the cache) the tagged, tokenised corpus and
serves padded batches of `input_ids`, `attention_mask`, `labels` and per-token `scores`."""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoTokenizer

from alignment.data.build import build
from alignment.data.shards import Split
from alignment.objectives import IGNORE_INDEX
from alignment.task import Task

log = logging.getLogger(__name__)


class SequenceDataset(Dataset):
    """One example per stored sequence (a sentence or a document), truncated to block_size."""

    def __init__(self, split: Split, block_size: int):
        self.split, self.block_size = split, block_size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        a, b = self.split.offsets[i], min(self.split.offsets[i + 1], self.split.offsets[i] + self.block_size)
        return np.array(self.split.tokens[a:b]), np.array(self.split.scores[a:b])  # copies: the split is mapped


class PackedDataset(Dataset):
    """Study A's layout: documents concatenated with EOS at each document start, cut into
    fixed-length blocks (the last partial block is dropped)."""

    def __init__(self, split: Split, block_size: int):
        # Every stored sequence starts and ends with EOS; dropping the trailing one leaves a single EOS between
        # documents, as in study A. The packed stream is not materialised (the split may be larger than memory):
        # sequence j starts at packed position offsets[j] - j, so packed position p is stored position p + j.
        self.split, self.block_size = split, block_size
        self.packed_starts = np.asarray(split.offsets[:-1]) - np.arange(len(split))

    def __len__(self):
        return (len(self.split.tokens) - len(self.split)) // self.block_size

    def __getitem__(self, i):
        packed = np.arange(i * self.block_size, (i + 1) * self.block_size)
        stored = packed + np.searchsorted(self.packed_starts, packed, side="right") - 1
        return self.split.tokens[stored], self.split.scores[stored]


class LengthGroupedSampler(DistributedSampler):
    """Random order, but examples of similar length next to each other, so a padded batch of
    sentences wastes little compute (tweets range from 5 to 64 tokens: plain shuffling pads about
    half of every batch). Shuffle, cut into windows of `window` batches, sort each window by length,
    then shuffle the order of the resulting batches. A new order every epoch (`set_epoch`).

    With DDP (num_replicas > 1) every rank takes whole batches (rank r: batches r, r + n, ...), the same
    number on every rank. It is a DistributedSampler so that Lightning does not shard it again example
    by example, which would mix a long and a short half-batch (57% of DDP batch tokens real, not 95%).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, window: int = 50, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.skip = 0  # batches of this epoch to leave out once: a run resumed mid-epoch trained them already

    def __len__(self):
        if self.num_replicas == 1:
            return len(self.lengths)
        return len(self.lengths) // (self.batch_size * self.num_replicas) * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        order = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")]
                                for w in np.split(order, range(span, len(order), span))])
        batches = np.split(order, range(self.batch_size, len(order), self.batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        batches.sort(key=lambda b: len(b) < self.batch_size)  # the one short batch last: it would split a group
        if self.num_replicas > 1:
            full = [b for b in batches if len(b) == self.batch_size]
            batches = full[self.rank::self.num_replicas][: len(full) // self.num_replicas]
        batches, self.skip = batches[self.skip:], 0
        return iter(np.concatenate(batches).tolist() if batches else [])


def collate(batch, pad_id: int, unlearned_ids: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions, and tokens in `unlearned_ids` (control tokens when
    they are inputs only), get label IGNORE_INDEX (-100: ignored by the loss)."""
    length = max(len(t) for t, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    scores = torch.zeros((len(batch), length), dtype=torch.float32)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (t, s) in enumerate(batch):
        input_ids[row, : len(t)] = torch.from_numpy(t.astype(np.int64))
        scores[row, : len(s)] = torch.from_numpy(s)
        attention_mask[row, : len(t)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if unlearned_ids:
        labels = labels.masked_fill(torch.isin(input_ids, torch.tensor(unlearned_ids)), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "scores": scores}


class AlignmentDataModule(pl.LightningDataModule):
    def __init__(self, data: DictConfig, task: DictConfig, tagging: bool, filter_threshold, tokenizer: DictConfig,
                 cache_dir: str, batch_size: int = 32, num_workers: int = 0, progress: bool = True,
                 control_token_loss: bool = True, seed: int = 0):
        super().__init__()
        self.control_token_loss, self.seed = control_token_loss, seed
        self.data_cfg, self.task_cfg, self.tokenizer_cfg = data, task, tokenizer
        self.tagging, self.filter_threshold = tagging, filter_threshold
        self.cache_dir, self.batch_size = Path(cache_dir), batch_size
        self.num_workers, self.progress = num_workers, progress
        self.folder: Path | None = None
        self._tokenizer = None
        self._configured_task: Task | None = None  # its scorers, instantiated once
        self._task: Task | None = None

    def prepare_data(self):
        """Build the dataset (a cache hit after the first time)."""
        self.folder = build(self.data_cfg, self.configured_task, self.tagging, self.filter_threshold,
                            self.tokenizer_cfg, self.cache_dir, progress=self.progress)
        log.info("Data: %s", {k: self.meta["stats"][k] for k in ("train_examples", "train_tokens", "val_examples")})

    @property
    def configured_task(self) -> Task:
        """The task as configured: quantile thresholds not yet resolved."""
        if self._configured_task is None:
            self._configured_task = Task.from_config(self.task_cfg)
        return self._configured_task

    @property
    def task(self) -> Task:
        """The task as this dataset trains it (thresholds resolved by the build): what the objective, the
        evaluation and the model card read."""
        if self._task is None:
            self._task = self.configured_task.as_trained(self.meta, self.tagging)
        return self._task

    def setup(self, stage: str | None = None):
        if self.folder is None:
            self.prepare_data()
        block = int(self.data_cfg.get("block_size") or 128)
        view = PackedDataset if self.meta["layout"] == "packed" else SequenceDataset
        self.train_set = view(Split.load(self.folder, "train", mmap=True), block)
        # Without control tokens the two validation splits are the same text: evaluate it once.
        names = ("val", "val_untagged") if self.meta["control_tokens"] else ("val",)
        self.val_sets = [view(Split.load(self.folder, name, mmap=True), block) for name in names]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.folder is None:
                self.prepare_data()
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder / "tokenizer")
        return self._tokenizer

    @property
    def meta(self) -> dict:
        if self.folder is None:
            self.prepare_data()
        return json.loads((self.folder / "meta.json").read_text())

    def val_sentences(self) -> list[dict]:
        """Held-out sentences with their levels, used as prompts by the prompted evaluation."""
        with open(self.folder / "val_sentences.jsonl") as f:
            return [json.loads(line) for line in f]

    def _loader(self, dataset, sampler=None) -> DataLoader:
        # Without a loss on them, control tokens are pure inputs: the model learns p(text | tokens), not how
        # often each token occurs (evaluation draws missing tokens from the corpus's counts instead).
        unlearned = () if self.control_token_loss else \
            tuple(self.tokenizer.convert_tokens_to_ids(self.meta["control_tokens"]))
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id, unlearned_ids=unlearned),
                          drop_last=sampler is not None)

    def train_dataloader(self):
        lengths = np.minimum(np.diff(self.train_set.split.offsets), self.train_set.block_size) \
            if isinstance(self.train_set, SequenceDataset) else np.full(len(self.train_set), self.train_set.block_size)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        return self._loader(self.train_set, LengthGroupedSampler(lengths, self.batch_size, seed=self.seed,
                                                                 num_replicas=world, rank=rank))

    def val_dataloader(self):
        # 0: the validation split as trained (tagged); 1: the same text untagged (capability), when they differ.
        return [self._loader(v) for v in self.val_sets]
