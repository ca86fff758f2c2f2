"""The benchmark: its table is complete and self-consistent, and its building blocks compute what they claim.

No timing assertions: speed depends on the machine and its load; the benchmark reports ratios for people to read.
"""
import importlib.util
import math
import re

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from alignment.evaluation.sampling import sample
from benchmarks.bench import (
    Row,
    format_number,
    format_table,
    generate_hf,
    greedy_without_cache,
    grouped_batches,
    interleaved,
    main,
    memory_measurable,
    padding_share,
    peak_rss_growth_mib,
    random_batches,
    with_eos_bias,
)

ACCELERATE = importlib.util.find_spec("accelerate") is not None  # transformers.Trainer's; dev installs it
EXPECTED_ROWS = [  # (start of the name, unit), in the printed order
    ("training", "tokens/s"),  # the Lightning Trainer vs a bare loop
    ("training phase", "tokens/s"),  # the default run's training phase vs a bare loop
    ("sampling", "tokens/s"),
    ("sampling", "tokens/s"),  # generate
    ("guided sampling", "tokens/s"),
    ("sampling to EOS", "tokens/s"),  # generate steps every row until the last ends, sample drops ended rows
    ("train step", "tokens/s"),
    ("padding", "pad share"),
    ("batching", "real tok/s"),
    ("vocabulary", "tokens/sent"),
    ("vocabulary", "tokens/s"),
    ("vocabulary", "chars/s"),
    *([("training", "sentences/s")] if ACCELERATE else []),  # transformers.Trainer
    ("scoring", "texts/s"),
    ("peak memory", "MiB"),
    ("build peak memory", "MiB"),
    ("MFU fp32", "GFLOP/s"),
    ("MFU bf16", "GFLOP/s"),
]


def table_rows(printed: str) -> list[list[str]]:
    """The data rows of the printed Markdown table, as lists of cell strings."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_quick_run_prints_every_row_with_consistent_ratios(runs_dir, capsys):
    # One thread: on a busy 2-core machine two threads spend most of their time waiting for each other.
    returned = main(["--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "torch" in printed.splitlines()[0] and "threads" in printed.splitlines()[0]

    rows = table_rows(printed)
    assert [(name.split(":")[0], unit) for name, _, _, unit, _, _ in rows] == EXPECTED_ROWS
    for (name, a, b, unit, ratio, meaning), row in zip(rows, returned):
        a, b, ratio = float(a), float(b), float(ratio)
        assert all(math.isfinite(x) and x > 0 for x in (a, b, ratio)), name
        # A and B are printed with >= 4 significant digits, the ratio with 3 decimals.
        assert ratio == pytest.approx(b / a, rel=2e-3, abs=5e-4), name
        assert (a, b) == (pytest.approx(row.a, rel=1e-3), pytest.approx(row.b, rel=1e-3))
        assert meaning
    # The no-cache baseline decodes the same tokens (a float near-tie may flip one and change the rest of its row).
    agreement = re.search(r"same token at ([0-9.]+)% of positions", printed)
    assert agreement and float(agreement.group(1)) >= 90
    # The project's sampler and Hugging Face's generate decode greedily the same tokens, every one of them.
    assert re.search(r"greedy decoding gave the same token as the project's sampler at 100.0% of [1-9]", printed)
    assert ACCELERATE or "hf-trainer: skipped" in printed
    assert "loop: both sides trained the same batches: yes" in printed
    # 12 steps in epochs of 8 batches, a checkpoint after the validations at steps 6 and 12, MLflow at step 10.
    assert "run: both sides trained the same batches: yes" in printed
    assert re.search(r"run: B's cycles by kind: first 1 x .*checkpoint 2 x .*epoch 1 x .*logging 1 x .*ordinary 7 x",
                     printed)
    assert re.search(r"MFU [0-9.]+% fp32, [0-9.]+% bf16", printed)


def test_torch_threads_are_restored_after_a_run(capsys):
    threads = torch.get_num_threads()
    main(["--quick", "--threads", "1", "--only", "scoring"])
    assert torch.get_num_threads() == threads
    assert len(table_rows(capsys.readouterr().out)) == 1


def test_padding_share_by_hand():
    lengths = np.array([2, 4, 4, 1])
    # Batch [0, 1]: 2 x 4 slots, 6 real; batch [2, 3]: 2 x 4 slots, 5 real -> 5 padded of 16.
    assert padding_share(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(5 / 16)
    # Sorted by length: [1, 2] and [0, 3] -> (0 + 1) padded of 8 + 4.
    assert padding_share(lengths, [np.array([1, 2]), np.array([0, 3])]) == pytest.approx(1 / 12)


def test_both_orders_use_each_example_at_most_once_in_full_batches():
    lengths = np.random.default_rng(1).integers(5, 65, size=1003)
    for batches in (random_batches(len(lengths), 32), grouped_batches(lengths, 32)):
        assert len(batches) == 1003 // 32 and all(len(batch) == 32 for batch in batches)
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == len(flat)
    assert padding_share(lengths, grouped_batches(lengths, 32)) < padding_share(lengths, random_batches(1003, 32))


def test_interleaved_warms_up_then_alternates_and_takes_medians():
    calls = []
    a_values, b_values = iter([1000.0, 1.0, 5.0, 3.0]), iter([2000.0, 20.0, 40.0, 30.0])

    def measure(side, values):
        def run():
            calls.append(side)
            return next(values)
        return run

    # The first call of each side (1000, 2000) is the warm-up and does not count.
    assert interleaved(measure("a", a_values), measure("b", b_values), repeats=3) == (3.0, 30.0)
    assert calls == ["a", "b"] * 4


def test_greedy_without_cache_decodes_what_sample_decodes():
    torch.manual_seed(0)
    # A large init spread makes the next-token distributions peaked, so greedy choices are not near-ties.
    config = GPT2Config(vocab_size=40, n_positions=64, n_layer=2, n_embd=16, n_head=2, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    prompts = [[0, 5, 6, 7], [0], [0, 9, 9, 3, 12, 30, 2]]  # different lengths: left padding on both sides
    baseline = greedy_without_cache(model, prompts, eos_id=0, pad_id=39, new_tokens=10)
    cached = sample(model, prompts, eos_id=0, pad_id=39, max_new_tokens=10, min_new_tokens=10, temperature=0)
    assert baseline == cached
    assert all(len(tokens) == 10 and 0 not in tokens for tokens in baseline)  # EOS held back, as in `sample`


def test_greedy_sample_equals_generate_token_for_token():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=64, n_layer=2, n_embd=16, n_head=2, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    prompts = [[0, 5, 6, 7], [0], [0, 9, 9, 3, 12, 30, 2]]
    blocked = [33, 34, 35]
    ours = sample(model, prompts, eos_id=0, pad_id=39, max_new_tokens=12, min_new_tokens=12, temperature=0,
                  blocked_ids=blocked)
    theirs = generate_hf(model, prompts, eos_id=0, pad_id=39, new_tokens=12, temperature=0, blocked_ids=blocked)
    assert ours == theirs
    assert all(len(tokens) == 12 and not {0, *blocked} & set(tokens) for tokens in ours)
    # Without the ban too (the blocked ids then do occur).
    free = sample(model, prompts, eos_id=0, pad_id=39, max_new_tokens=12, min_new_tokens=12, temperature=0)
    assert free == generate_hf(model, prompts, eos_id=0, pad_id=39, new_tokens=12, temperature=0)
    assert any(set(blocked) & set(tokens) for tokens in free)


def test_eos_bias_makes_samples_end_after_the_given_mean_length():
    config = GPT2Config(vocab_size=40, n_positions=16, n_layer=1, n_embd=8, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # the (tied) output layer too: every logit is 0, as near-uniform
    biased = with_eos_bias(model, eos_id=0, mean_length=5, temperature=2.0)
    with torch.no_grad():
        logits = biased(torch.tensor([[3, 4]])).logits[0, -1]
    # b = 2 ln(40 / 4): at temperature 2, EOS weighs e^(b/2) = 10 against 39 other tokens of weight 1.
    assert float((logits / 2.0).softmax(-1)[0]) == pytest.approx(10 / 49, rel=1e-5)
    assert model.lm_head.bias is None  # the original model is left as it was


def test_generate_hf_cuts_at_eos_as_sample_does():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=64, n_layer=2, n_embd=16, n_head=2, initializer_range=0.3)
    model = with_eos_bias(GPT2LMHeadModel(config), eos_id=0, mean_length=3, temperature=1.0)
    prompts = [[0, 5, 6, 7], [0], [0, 9, 9, 3, 12, 30, 2]]
    ours = sample(model, prompts, eos_id=0, pad_id=39, max_new_tokens=12, min_new_tokens=2, temperature=0)
    theirs = generate_hf(model, prompts, eos_id=0, pad_id=39, new_tokens=12, min_new_tokens=2, temperature=0)
    assert ours == theirs
    assert all(len(tokens) >= 2 and 0 not in tokens for tokens in ours)
    assert any(len(tokens) < 12 for tokens in ours)  # some rows did end before the others


def test_row_ratio_and_table_format():
    row = Row("x: A a, B b", a=4.0, b=1.0, unit="MiB", meaning="smaller")
    assert row.ratio == 0.25
    assert format_table([row]).splitlines()[-1] == "| x: A a, B b | 4.000 | 1.000 | MiB | 0.250 | smaller |"
    assert [format_number(x) for x in (0.0312345, 12345.6, 1.5, 150.25)] == ["0.03123", "12346", "1.500", "150.2"]


@pytest.mark.skipif(not memory_measurable(), reason="needs Linux's resettable peak RSS")
def test_peak_rss_growth_sees_a_64_mib_tensor():
    growth = peak_rss_growth_mib(lambda: torch.ones(16 * 2**20))  # 16M float32, every page written
    assert 63 <= growth <= 80
    assert peak_rss_growth_mib(lambda: None) < 2
