"""The learning-rate schedule (alignment.module.warmup_then_decay: transformers' schedules, the warmup capped at a
tenth of the run) step by step, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.trainer_utils import SchedulerType

from alignment.module import warmup_then_decay
from alignment.validation import SCHEDULES


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


def test_the_default_warms_up_from_zero_for_a_tenth_of_the_run_then_decays_by_cosine_to_the_floor():
    # 100 steps: warmup 20 is capped at 10 (steps 0..9 at 0/10..9/10), then 90 steps of cosine to 0.1 x lr.
    rates = learning_rates(101, total_steps=100, warmup_steps=20, min_lr_rate=0.1)
    assert rates[:11] == pytest.approx([2.0 * k / 10 for k in range(10)] + [2.0])
    # step 28: 18 of 90 decay steps (0.2): 0.1 + 0.9 * (1 + cos(0.2 pi)) / 2 = 0.91406; step 55: halfway, 0.55
    assert rates[28] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(0.2 * math.pi))))
    assert rates[28] == pytest.approx(2 * 0.914058, abs=1e-6)
    assert rates[55] == pytest.approx(2.0 * 0.55)
    assert rates[100] == pytest.approx(0.2)  # the floor at the last planned step
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_linear_decays_to_zero_and_constant_with_warmup_stays():
    rates = learning_rates(101, total_steps=100, warmup_steps=5, name="linear")
    assert rates[:6] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2.0])
    # step 24: 76 of the 95 decay steps left -> 0.8; step 100: 0
    assert rates[24] == pytest.approx(2.0 * 0.8) and rates[100] == pytest.approx(0.0)
    rates = learning_rates(50, total_steps=40, warmup_steps=4, name="constant_with_warmup")
    assert rates[:4] == pytest.approx([0.0, 0.5, 1.0, 1.5]) and rates[4:] == [2.0] * 46


def test_a_run_shorter_than_ten_steps_warms_up_in_one_step():
    rates = learning_rates(6, total_steps=5, warmup_steps=100, name="linear")
    assert rates == pytest.approx([0.0, 2.0, 1.5, 1.0, 0.5, 0.0])  # warmup 1 step, then 4 steps down to 0


def test_a_null_option_is_left_out():
    # study A's configs set min_lr_rate to null: transformers' linear schedule takes no such argument
    assert learning_rates(3, total_steps=20, warmup_steps=1, name="linear", min_lr_rate=None)[1] == pytest.approx(2.0)


def test_the_validated_names_are_transformers_schedules():
    # reduce_lr_on_plateau and greedy need more than a warmup and a length, so the config cannot choose them
    assert set(SCHEDULES) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau", "greedy"}
