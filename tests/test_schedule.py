"""The learning-rate schedule (alignment.module.warmup_then_decay) step by step, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from alignment.module import warmup_then_decay


def learning_rates(steps: int, **schedule) -> list[float]:
    """The lr of each optimizer step 0..steps-1, from base lr 2.0, driven the way Lightning's `interval: step` does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_then_decay(optimizer, **schedule)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_is_capped_at_a_tenth_of_the_run_then_cosine_to_the_floor():
    # 100 steps: warmup 20 is capped at 10 (steps 0..9 at 1/10..10/10), then 90 steps of cosine to 0.1 x lr.
    rates = learning_rates(120, total_steps=100, warmup_steps=20, decay="cosine", min_ratio=0.1)
    assert rates[:11] == pytest.approx([2.0 * k / 10 for k in range(1, 11)] + [2.0])
    # step 28: 18 of 90 decay steps (0.2): 0.1 + 0.9 * (1 + cos(0.2 pi)) / 2 = 0.91406; step 55: halfway, 0.55
    assert rates[28] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(0.2 * math.pi))))
    assert rates[28] == pytest.approx(2 * 0.914058, abs=1e-6)
    assert rates[55] == pytest.approx(2.0 * 0.55)
    assert rates[100:] == pytest.approx([0.2] * 20)  # at the floor from the last planned step on, never below
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_linear_decay_and_constant():
    rates = learning_rates(101, total_steps=100, warmup_steps=5, decay="linear", min_ratio=0.1)
    assert rates[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    # step 24: 19 of 95 decay steps (0.2) -> 0.1 + 0.9 * 0.8 = 0.82; step 100: the floor
    assert rates[24] == pytest.approx(2.0 * 0.82) and rates[100] == pytest.approx(0.2)
    assert learning_rates(50, total_steps=40, warmup_steps=4, decay="constant", min_ratio=0.1)[4:] == [2.0] * 46


def test_a_run_shorter_than_ten_steps_warms_up_in_one_step_and_the_floor_defaults_to_zero():
    rates = learning_rates(6, total_steps=5, warmup_steps=100, decay="linear")
    assert rates == pytest.approx([2.0, 2.0, 1.5, 1.0, 0.5, 0.0])  # warmup 1 step, then 4 steps down to 0


def test_unknown_decay_is_a_clear_error():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="decay must be cosine, linear or constant, got 'exponential'"):
        warmup_then_decay(optimizer, total_steps=10, decay="exponential")
