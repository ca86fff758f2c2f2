"""LengthGroupedSampler: batches of similar lengths, every example once, whole equal-count batches per DDP rank."""
from __future__ import annotations

import numpy as np

from alignment.data.datamodule import LengthGroupedSampler


def batches(sampler: LengthGroupedSampler) -> list[list[int]]:
    order = list(sampler)
    size = sampler.batch_size
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_one_process_sees_every_example_once_in_length_sorted_batches_short_batch_last():
    lengths = np.random.default_rng(0).permutation(50)  # distinct lengths 0..49, so a batch's lengths say its group
    sampler = LengthGroupedSampler(lengths, batch_size=8, window=100)  # one window: the whole set sorted by length
    found = batches(sampler)
    assert len(sampler) == 50 and sorted(i for b in found for i in b) == list(range(50))
    assert [len(b) for b in found] == [8] * 6 + [2]
    # Sorted longest first, then cut: batches hold lengths 49..42, 41..34, ... and the short one 1, 0.
    groups = sorted(sorted(lengths[b].tolist()) for b in found)
    assert groups == [[0, 1]] + [list(range(k, k + 8)) for k in range(2, 50, 8)]
    assert sorted(lengths[found[-1]].tolist()) == [0, 1]


def test_windows_group_lengths_only_within_themselves():
    lengths = np.arange(64)
    found = batches(LengthGroupedSampler(lengths, batch_size=4, window=2))  # windows of 8 random examples
    assert all(list(lengths[b]) == sorted(lengths[b], reverse=True) for b in found)  # sorted within a batch...
    assert sorted(i for b in found for i in b) == list(range(64))
    spans = [int(np.ptp(lengths[b])) for b in found]
    assert max(spans) > 8  # ...but not across the whole set: a window of 8 random lengths out of 64 is spread out


def test_two_replicas_take_disjoint_whole_batches_the_same_number_each():
    lengths = np.random.default_rng(1).integers(5, 64, size=54)  # 13 full batches of 4 and a short one of 2
    whole = batches(LengthGroupedSampler(lengths, batch_size=4, window=3, seed=7))
    ranks = [LengthGroupedSampler(lengths, batch_size=4, window=3, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    per_rank = [batches(s) for s in ranks]
    # Rank r takes batches r, r + 2, ... of the one-process order: 6 each, the 13th full batch and the short one
    # left out so that both ranks step the same number of times.
    assert per_rank[0] == whole[0:12:2] and per_rank[1] == whole[1:12:2]
    assert [len(s) for s in ranks] == [24, 24] == [sum(len(b) for b in p) for p in per_rank]
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))
    assert all(len(b) == 4 for p in per_rank for b in p)


def test_set_epoch_reorders_and_the_same_epoch_repeats():
    lengths = np.random.default_rng(2).integers(5, 64, size=40)
    sampler = LengthGroupedSampler(lengths, batch_size=4, window=2, seed=3, num_replicas=2, rank=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and len(second) == len(first) == 20
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, batch_size=4, window=2, seed=4, num_replicas=2, rank=1)) != first
