"""Speed and memory of the project's choices, each measured against its alternative in the same run.

    python -m benchmarks.bench [--quick] [--only NAME ...]        (or `make bench ARGS="--quick"`)

Shared CPU machines are noisy, so absolute timings say little and timed tests would be flaky. Here every
comparison runs its two sides interleaved (A, B, A, B, ... after one untimed warm-up of each) on the real offline
components -- tweet sentences from `TweetsSource` + `Sentencizer`, the trained 8k BPE, the small model
(4 layers x 256, conf/model/small.yaml) -- and reports the median of each side and the ratio B/A. Background load
that comes and goes hits both sides alike, so the ratio is what to read. Training comparisons alternate single
steps (the same batch on both sides of a pair), so their two sides are never more than a second apart.
A is always the alternative, B what the project does (KV cache, bf16, length grouping, corpus BPE, score cache), or
what a user would use instead against the project (a bare PyTorch loop vs the Lightning Trainer, Hugging Face's
`generate` and `Trainer`); for MFU, A is the matmul peak measured in the same run and B the training step.

Comparisons (names for --only): loop, run, sampling, generate, precision, batching, vocabulary, hf-trainer, scoring,
memory, build, mfu. hf-trainer needs `accelerate` (transformers.Trainer does); without it that row is skipped with a
note. build is the one row that is not a pair of alternatives: it builds the dataset of the tweets and of 10 copies
of them, each in its own process, and compares the memory the two builds take.
`--quick` shrinks every size so that the whole run takes seconds (the test runs it); the default takes a few
minutes on 2 cores, plus ~16 for `run` (the default run's whole training, twice: `--run-override
trainer.max_steps=600` shortens it).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from alignment.data.datamodule import LengthGroupedSampler, collate
from alignment.data.sentences import Sentencizer
from alignment.data.sources import TweetsSource
from alignment.evaluation.sampling import sample
from alignment.model import build_model
from alignment.objectives import MLE
from alignment.tokenizer import add_control_tokens, gpt2_tokenizer_offline, train_bpe
from benchmarks.loop import default_config

# The shipped default config (conf/config.yaml as `python -m alignment` composes it): the benchmark measures that
# model, vocabulary, optimiser and precision, so it reads them rather than keeping copies.
_DEFAULT = default_config()
SMALL_ARCH = OmegaConf.to_container(_DEFAULT.model.arch)
BPE_VOCAB_SIZE = _DEFAULT.model.tokenizer.vocab_size
OPTIMIZER = {key: value for key, value in OmegaConf.to_container(_DEFAULT.module.optimizer).items()
             if not key.startswith("_")}
SAMPLING = _DEFAULT.eval.sampling
# The default task's control tokens: the evaluation blocks them, and guidance contrasts prompts with and without them.
# (Read from the config: building the Task would load its scorers.)
CONTROL_TOKENS = [token for name in _DEFAULT.task.tagged for token in _DEFAULT.task.attributes[name].tokens]
ALIGNED_TOKENS = [_DEFAULT.task.attributes[name].aligned for name in _DEFAULT.task.tagged]
# The comparisons that are not about precision train as the default trainer does.
TRAIN_BF16 = _DEFAULT.trainer.precision == "bf16-mixed"
SEED = 0


@dataclass(frozen=True)
class Sizes:
    tweets: int | None   # tweets read (None = all 38k); the BPE is trained on their sentences
    sentences: int       # sentences the batches are drawn from (padding shares are over all of them)
    repeats: int         # timed A/B pairs of sampling, scoring and memory runs; each side reports the median
    batch_size: int      # training batch (conf/config.yaml: 32)
    train_pairs: int     # timed A/B pairs of single train steps (a new batch for each pair)
    prompts: int         # sampling batch (conf/eval: 64)
    prompt_words: int    # words of a sentence in each prompt (conf/eval/prompted.yaml: 4)
    new_tokens: int      # tokens generated per prompt (conf/eval/unconditional.yaml: 64)
    score_texts: int     # texts scored per repetition
    loop_steps: int      # timed steps of each side of the Lightning-vs-bare-loop comparison
    build_tweets: int | None  # tweets in the 1x corpus of the build's memory comparison (None = all 38k)
    shard_documents: int      # the build's shard size there (the default, 50000, makes the 38k tweets one shard)
    run: tuple[str, ...] = ()  # overrides of the default run's trainer for the training-phase comparison (none:
                               # the default run's 2,800 steps, ~16 min on 2 idle cores with the bare side)


# A few minutes on 2 idle cores. Sampling without a cache costs prompts x new_tokens^2 (the 50k-vocabulary model is
# the other slow side), which is what caps these sizes on a shared machine.
FULL = Sizes(tweets=None, sentences=16000, repeats=5, batch_size=32, train_pairs=21, prompts=32, prompt_words=4,
             new_tokens=48, score_texts=3000, loop_steps=100, build_tweets=None, shard_documents=50_000)
QUICK = Sizes(tweets=1500, sentences=600, repeats=3, batch_size=8, train_pairs=3, prompts=8, prompt_words=4,
              new_tokens=8, score_texts=200, loop_steps=4, build_tweets=200, shard_documents=300,
              # 12 steps in epochs of 8 batches, validation (and so a checkpoint) every 6, MLflow at step 10
              run=("trainer.max_steps=12", "trainer.limit_train_batches=8", "trainer.val_check_interval=6",
                   "trainer.limit_val_batches=2"))


@dataclass(frozen=True)
class Row:
    """One line of the table: side A, side B, their unit and what B/A means."""

    name: str
    a: float
    b: float
    unit: str
    meaning: str

    @property
    def ratio(self) -> float:
        return self.b / self.a


# ----------------------------------------------------------------------------------------------
# Measuring

def rate(run: Callable[[], float | np.ndarray]) -> float | np.ndarray:
    """Amount per second: `run()` does the work and returns the amount it processed (tokens, texts...), or an array
    of amounts in different units (tokens and characters) for as many rates."""
    start = time.perf_counter()
    amount = run()
    return amount / (time.perf_counter() - start)


def interleaved(measure_a: Callable[[], float | np.ndarray], measure_b: Callable[[], float | np.ndarray],
                repeats: int) -> tuple:
    """Median of `repeats` measurements of each side (element-wise for arrays), taken A, B, A, B, ... after one
    untimed call of each (first calls pay for allocations and kernel selection that later calls reuse)."""
    measure_a(), measure_b()
    a_values, b_values = [], []
    for _ in range(repeats):
        a_values.append(measure_a())
        b_values.append(measure_b())
    return np.median(np.array(a_values), axis=0), np.median(np.array(b_values), axis=0)


def _libc_malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc only), so that RSS growth counts what a step needs, not
    what the allocator kept from an earlier step."""
    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_measurable() -> bool:
    """Linux lets a process reset its peak RSS (write 5 to /proc/self/clear_refs); elsewhere the peak can only
    grow, so two sides measured in one process would not be comparable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_growth_mib(run: Callable[[], object]) -> float:
    """How far the resident set size rises above its starting point while `run()` executes, in MiB.

    RSS, not tracemalloc: torch allocates tensors outside Python's allocator, where tracemalloc cannot see them.
    """
    gc.collect()
    _libc_malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) / 1024


# ----------------------------------------------------------------------------------------------
# The pieces being compared

def small_model(vocab_size: int, seed: int = SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(vocab_size=vocab_size, arch=SMALL_ARCH)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), **OPTIMIZER)


def train_step(model, optimizer, batch: dict[str, torch.Tensor], bf16: bool) -> int:
    """Forward + MLE loss + backward + AdamW step, as the LightningModule does it; returns the real (unpadded)
    tokens of the batch. Like Lightning's bf16-mixed, autocast covers forward and loss, not backward."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = MLE()(logits.float(), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def stepper(model, optimizer, batches: Sequence[dict], bf16: bool) -> Callable[[], int]:
    """A callable that trains one step on the next batch (cycling) and returns its real tokens.

    One step per timed measurement: the two sides of a comparison then alternate step by step, a second apart,
    and share whatever load the machine has. Both sides see their batches in the same order, so pair i of an
    interleaved comparison is the same batch on both sides.
    """
    batches = itertools.cycle(batches)
    return lambda: train_step(model, optimizer, next(batches), bf16)


@torch.no_grad()
def greedy_without_cache(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, new_tokens: int
                         ) -> list[list[int]]:
    """The baseline for the KV cache: greedy decoding that runs the whole left-padded sequence through the model
    at every step. Same inputs as `sample(..., temperature=0, min_new_tokens=new_tokens)` (EOS held back, so every
    prompt gets exactly `new_tokens` tokens) and the same outputs, up to float rounding."""
    model.eval()
    ids, mask = left_padded(prompts, pad_id)
    width = ids.shape[1]
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits, as `sample` asks for: the baseline pays for the prefix, nothing more.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=1).logits[:, -1].float()
        logits[:, eos_id] = -torch.inf
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, width:].tolist()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of prompts padded on the left, as decoding needs them."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def generate_hf(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, new_tokens: int, temperature: float,
                top_p: float = 1.0, blocked_ids: Sequence[int] = (), guidance_scale: float = 1.0,
                uncond_prompts: list[list[int]] | None = None, min_new_tokens: int | None = None) -> list[list[int]]:
    """What a user would call instead of `sample`: Hugging Face's `generate`, one batch, at most `new_tokens` tokens
    per prompt and at least `min_new_tokens` (default: exactly `new_tokens`), control tokens blocked with
    `bad_words_ids`, and with `guidance_scale` != 1 its own classifier-free guidance (`negative_prompt_ids`: one more
    forward pass per step for the unconditioned prompts). temperature 0 means greedy. Like `sample`, returns only
    the generated ids, cut before EOS (generate pads a finished row until the whole batch has finished)."""
    model.eval()
    ids, mask = left_padded(prompts, pad_id)
    options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else \
        dict(do_sample=False)
    if guidance_scale != 1.0:
        negative, negative_mask = left_padded(uncond_prompts, pad_id)
        options.update(guidance_scale=guidance_scale, negative_prompt_ids=negative,
                       negative_prompt_attention_mask=negative_mask)
    if blocked_ids:
        options["bad_words_ids"] = [[token] for token in blocked_ids]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens if min_new_tokens is None else min_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id, **options)
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out[:, ids.shape[1]:].tolist()]


def with_eos_bias(model: torch.nn.Module, eos_id: int, mean_length: float, temperature: float) -> torch.nn.Module:
    """A copy of an untrained model whose samples end after about `mean_length` tokens, as a trained model's do.

    An untrained model's next-token distribution is nearly uniform over its V tokens, so EOS would come once in
    ~V steps and no sample would end. A bias b on EOS's logit makes its probability at temperature T about
    e^(b/T) / (e^(b/T) + V); b = T ln(V / (L - 1)) sets it to 1/L, the stopping rate of lengths averaging L.
    """
    biased = copy.deepcopy(model)
    vocab = biased.config.vocab_size
    bias = torch.zeros(vocab)
    bias[eos_id] = temperature * np.log(vocab / (mean_length - 1))
    biased.lm_head.bias = torch.nn.Parameter(bias)  # GPT-2's output layer has no bias of its own (tied weights)
    return biased.eval()


def padding_share(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Share of the positions of right-padded batches that are padding."""
    real = sum(int(lengths[batch].sum()) for batch in batches)
    slots = sum(len(batch) * int(lengths[batch].max()) for batch in batches)
    return 1 - real / slots


def random_batches(n: int, batch_size: int, seed: int = SEED) -> list[np.ndarray]:
    """Plain shuffling, the usual DataLoader(shuffle=True) order (full batches only)."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def grouped_batches(lengths: np.ndarray, batch_size: int, seed: int = SEED) -> list[np.ndarray]:
    """The project's order: LengthGroupedSampler, cut into full batches as the DataLoader (drop_last) does."""
    order = np.array(list(LengthGroupedSampler(lengths, batch_size, seed=seed)))
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------------------------
# Shared inputs, built on first use (so --only loads only what it needs)

class Assets:
    def __init__(self, sizes: Sizes):
        self.sizes = sizes

    @cached_property
    def corpus(self) -> list[str]:
        documents = Sentencizer()(TweetsSource(limit=self.sizes.tweets)())
        return [sentence for document in documents for sentence in document["sentences"]]

    @cached_property
    def sentences(self) -> list[str]:
        """A seeded random subset of the corpus, in a random order."""
        order = np.random.default_rng(SEED).permutation(len(self.corpus))[:self.sizes.sentences]
        return [self.corpus[i] for i in order]

    @cached_property
    def bpe(self):
        tokenizer = train_bpe(self.corpus, BPE_VOCAB_SIZE)
        add_control_tokens(tokenizer, CONTROL_TOKENS)  # the dedicated [PAD] too, as the dataset build does
        return tokenizer

    @cached_property
    def gpt2(self):
        tokenizer = gpt2_tokenizer_offline()
        add_control_tokens(tokenizer, [])
        return tokenizer

    def sequences(self, tokenizer) -> list[np.ndarray]:
        """EOS + sentence + EOS, cut to the model's context, as the dataset build stores an untagged sentence."""
        eos, limit = tokenizer.eos_token_id, SMALL_ARCH["n_positions"]
        encoded = tokenizer(self.sentences, add_special_tokens=False)["input_ids"]
        return [np.array(([eos] + ids + [eos])[:limit]) for ids in encoded]

    @cached_property
    def bpe_sequences(self) -> list[np.ndarray]:
        return self.sequences(self.bpe)

    @cached_property
    def bpe_lengths(self) -> np.ndarray:
        return np.array([len(sequence) for sequence in self.bpe_sequences])

    def batch(self, sequences: list[np.ndarray], indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        return collate([(sequences[i], np.zeros(len(sequences[i]), dtype=np.float32)) for i in indices], pad_id)

    def train_batches(self, sequences, index_batches, pad_id) -> list[dict[str, torch.Tensor]]:
        """The first batches of an epoch, as many as the timed pairs and the warm-up use."""
        return [self.batch(sequences, indices, pad_id) for indices in index_batches[:self.sizes.train_pairs + 1]]


def _paired_models(vocab_size: int):
    """Two identical models with their own optimizers, so neither side's updates touch the other's weights."""
    model = small_model(vocab_size)
    twin = copy.deepcopy(model)
    return (model, optimizer_for(model)), (twin, optimizer_for(twin))


# ----------------------------------------------------------------------------------------------
# The comparisons

def bench_sampling(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, tokenizer = assets.sizes, assets.bpe
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Prompted evaluation: EOS + the first words of held-out sentences.
    prompts = [[eos] + tokenizer(" ".join(s.split()[:sizes.prompt_words]), add_special_tokens=False)["input_ids"]
               for s in assets.sentences[:sizes.prompts]]
    model = small_model(len(tokenizer)).eval()
    outputs = {}

    def cached():
        outputs["cached"] = sample(model, prompts, eos_id=eos, pad_id=pad, max_new_tokens=sizes.new_tokens,
                                   min_new_tokens=sizes.new_tokens, temperature=0, batch_size=len(prompts))
        return sum(map(len, outputs["cached"]))

    def recomputed():
        outputs["recomputed"] = greedy_without_cache(model, prompts, eos_id=eos, pad_id=pad,
                                                     new_tokens=sizes.new_tokens)
        return sum(map(len, outputs["recomputed"]))

    a, b = interleaved(lambda: rate(recomputed), lambda: rate(cached), sizes.repeats)
    same = np.mean([x == y for xs, ys in zip(outputs["cached"], outputs["recomputed"]) for x, y in zip(xs, ys)])
    row = Row("sampling: A recompute prefix, B KV cache", a, b, "tokens/s",
              f"KV-cache speed-up (greedy, {len(prompts)} prompts, {sizes.new_tokens} new tokens)")
    return [row], [f"sampling: both sides generated the same token at {same:.1%} of positions"]


def bench_generate(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, tokenizer = assets.sizes, assets.bpe
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    control = tokenizer.convert_tokens_to_ids(CONTROL_TOKENS)
    words = [tokenizer(" ".join(s.split()[:sizes.prompt_words]), add_special_tokens=False)["input_ids"]
             for s in assets.sentences[:sizes.prompts]]
    # Prompted evaluation under the aligned combination: EOS, its control tokens, the first words; guidance
    # contrasts each with the same words without the tokens.
    aligned = tokenizer.convert_tokens_to_ids(ALIGNED_TOKENS)
    prompts, uncond = [[eos] + aligned + w for w in words], [[eos] + w for w in words]
    model = small_model(len(tokenizer)).eval()
    n, g = sizes.new_tokens, max(_DEFAULT.eval.guidance_scales)
    shared = dict(eos_id=eos, pad_id=pad, blocked_ids=control)
    drawn = dict(temperature=SAMPLING.temperature, top_p=SAMPLING.top_p)

    def ours(guidance=1.0, **settings):
        return sample(model, prompts, max_new_tokens=n, min_new_tokens=n, guidance_scale=guidance,
                      uncond_prompts=uncond if guidance != 1.0 else None, batch_size=len(prompts), **shared,
                      **settings)

    def theirs(guidance=1.0, **settings):
        return generate_hf(model, prompts, new_tokens=n, guidance_scale=guidance, uncond_prompts=uncond, **shared,
                           **settings)

    def tokens(outputs):
        return sum(map(len, outputs))

    rows = []
    for name, guidance in (("sampling", 1.0), ("guided sampling", g)):
        a, b = interleaved(lambda: rate(lambda: tokens(theirs(guidance, **drawn))),
                           lambda: rate(lambda: tokens(ours(guidance, **drawn))), sizes.repeats)
        what = "generate's CFG (2nd pass), B one-pass guidance" if guidance != 1.0 else "generate, B project sampler"
        rows.append(Row(f"{name}: A HF {what}", a, b, "tokens/s",
                        f"T {drawn['temperature']}, top-p {drawn['top_p']}, control tokens blocked, {len(prompts)} "
                        f"prompts x {n} tokens{f', g = {g:g}' if guidance != 1.0 else ''}; target >= 1.5"))
    row, note = _sampling_to_eos(assets, model, prompts, shared, drawn)
    rows.append(row)
    greedy_ours, greedy_theirs = ours(temperature=0), theirs(temperature=0)
    same = np.mean([x == y for xs, ys in zip(greedy_ours, greedy_theirs) for x, y in zip(xs, ys)])
    return rows, [note, f"generate: greedy decoding gave the same token as the project's sampler at {same:.1%} of "
                        f"{tokens(greedy_ours)} positions"]


def _sampling_to_eos(assets: Assets, model, prompts, shared, drawn) -> tuple[Row, str]:
    """What the evaluation does: sample until EOS (after the evaluation's minimum), at most new_tokens. generate
    keeps stepping every row until the last one has ended; `sample` drops a row from the batch when it ends. The
    model's EOS is raised so that samples end after about a corpus sentence's length (see `with_eos_bias`)."""
    n = assets.sizes.new_tokens
    least = min(SAMPLING.min_new_tokens, n)
    sentence = float(assets.bpe_lengths.mean()) - 2  # without its two EOS
    ending = with_eos_bias(model, shared["eos_id"], sentence, drawn["temperature"])
    lengths = {}

    def measure(side, generator):
        def run():
            outputs = generator(ending, prompts, **shared, **drawn)
            lengths[side] = [len(output) for output in outputs]
            return sum(lengths[side])
        return lambda: rate(run)

    a, b = interleaved(measure("A", lambda *args, **kw: generate_hf(*args, new_tokens=n, min_new_tokens=least, **kw)),
                       measure("B", lambda *args, **kw: sample(*args, max_new_tokens=n, min_new_tokens=least,
                                                               batch_size=len(prompts), **kw)), assets.sizes.repeats)
    row = Row("sampling to EOS: A HF generate, B project sampler", a, b, "tokens/s",
              f"as the evaluation samples: until EOS, {least} to {n} tokens, T {drawn['temperature']}, top-p "
              f"{drawn['top_p']}, {len(prompts)} prompts, EOS raised for ~{sentence:.0f}-token samples")
    note = (f"sampling to EOS: the last samples were {np.mean(lengths['A']):.1f} (generate) and "
            f"{np.mean(lengths['B']):.1f} (sample) tokens long on average, the longest {max(lengths['A'])} and "
            f"{max(lengths['B'])}")
    return row, note


def bench_precision(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, pad = assets.sizes, assets.bpe.pad_token_id
    batches = assets.train_batches(assets.bpe_sequences, grouped_batches(assets.bpe_lengths, sizes.batch_size), pad)
    (fp32, fp32_opt), (bf16, bf16_opt) = _paired_models(len(assets.bpe))
    step_fp32, step_bf16 = stepper(fp32, fp32_opt, batches, bf16=False), stepper(bf16, bf16_opt, batches, bf16=True)
    a, b = interleaved(lambda: rate(step_fp32), lambda: rate(step_bf16), sizes.train_pairs)
    return [Row("train step: A fp32, B bf16 autocast", a, b, "tokens/s", "bf16 speed-up of a training step")], []


def bench_batching(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, pad, lengths = assets.sizes, assets.bpe.pad_token_id, assets.bpe_lengths
    plain, grouped = random_batches(len(lengths), sizes.batch_size), grouped_batches(lengths, sizes.batch_size)
    padding = Row("padding: A random order, B length-grouped", padding_share(lengths, plain),
                  padding_share(lengths, grouped), "pad share", "padding left by grouping (< 1 = less)")
    plain_train = assets.train_batches(assets.bpe_sequences, plain, pad)
    grouped_train = assets.train_batches(assets.bpe_sequences, grouped, pad)
    (model_a, opt_a), (model_b, opt_b) = _paired_models(len(assets.bpe))
    step_plain = stepper(model_a, opt_a, plain_train, TRAIN_BF16)
    step_grouped = stepper(model_b, opt_b, grouped_train, TRAIN_BF16)
    a, b = interleaved(lambda: rate(step_plain), lambda: rate(step_grouped), sizes.train_pairs)
    speed = Row("batching: A random order, B length-grouped", a, b, "real tok/s",
                "speed-up in real (unpadded) tokens trained per second")
    return [padding, speed], []


def bench_vocabulary(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, bpe, gpt2 = assets.sizes, assets.bpe, assets.gpt2
    gpt2_sequences = assets.sequences(gpt2)
    # The same sentences in the same batches on both sides, so both train on exactly the same text.
    index_batches = grouped_batches(assets.bpe_lengths, sizes.batch_size)
    gpt2_batches = assets.train_batches(gpt2_sequences, index_batches, gpt2.pad_token_id)
    bpe_batches = assets.train_batches(assets.bpe_sequences, index_batches, bpe.pad_token_id)
    gpt2_model, bpe_model = small_model(len(gpt2)), small_model(len(bpe))
    step_gpt2 = _with_characters(stepper(gpt2_model, optimizer_for(gpt2_model), gpt2_batches, TRAIN_BF16),
                                 assets.sentences, index_batches[:len(gpt2_batches)])
    step_bpe = _with_characters(stepper(bpe_model, optimizer_for(bpe_model), bpe_batches, TRAIN_BF16),
                                assets.sentences, index_batches[:len(bpe_batches)])
    (tokens_a, chars_a), (tokens_b, chars_b) = interleaved(lambda: rate(step_gpt2), lambda: rate(step_bpe),
                                                           sizes.train_pairs)
    name = f"vocabulary: A GPT-2 {len(gpt2) // 1000}k, B BPE {len(bpe) // 1000}k"
    mean_a = np.mean([len(s) for s in gpt2_sequences]) - 2  # without the two EOS
    mean_b = assets.bpe_lengths.mean() - 2
    return [
        Row(name, mean_a, mean_b, "tokens/sent", "tokens per sentence (> 1 = BPE needs more)"),
        Row(name, tokens_a, tokens_b, "tokens/s", "speed-up in tokens trained per second"),
        Row(name, chars_a, chars_b, "chars/s", "speed-up in text trained per second (what a corpus costs)"),
    ], []


def bench_hf_trainer(assets: Assets) -> tuple[list[Row], list[str]]:
    from benchmarks.hf_trainer import MAX_LENGTH, accelerate_missing, padded_examples, trainer_vs_project

    if accelerate_missing():
        return [], ["hf-trainer: skipped (transformers.Trainer needs `pip install accelerate`)"]
    sizes, bpe, gpt2 = assets.sizes, assets.bpe, assets.gpt2
    batches = assets.train_batches(assets.bpe_sequences, grouped_batches(assets.bpe_lengths, sizes.batch_size),
                                   bpe.pad_token_id)
    bpe_model, gpt2_model = small_model(len(bpe)), small_model(len(gpt2))
    trainer, project = trainer_vs_project(gpt2_model, padded_examples(gpt2, assets.sentences), OPTIMIZER,
                                          sizes.batch_size, sizes.train_pairs, TRAIN_BF16,
                                          stepper(bpe_model, optimizer_for(bpe_model), batches, TRAIN_BF16))
    return [Row(f"training: A HF Trainer + GPT-2 {len(gpt2) // 1000}k padded to {MAX_LENGTH}, B project", trainer,
                project, "sentences/s", f"study B's pipeline vs the project's (BPE {len(bpe) // 1000}k, "
                f"length-grouped), same sentences and model size; target >= 5")], []


def _with_characters(step: Callable[[], int], sentences: list[str], index_batches) -> Callable[[], np.ndarray]:
    """Wrap a stepper so that it returns [tokens, characters] of the batch it trained on (same cycling order)."""
    characters = itertools.cycle([sum(len(sentences[i]) for i in indices) for indices in index_batches])
    return lambda: np.array([step(), next(characters)], dtype=np.float64)


def training_flops(model, batch: dict[str, torch.Tensor]) -> float:
    """Matmul FLOPs of one training step on a padded batch (B x T): forward 2 FLOPs per weight and position plus
    attention's two T x T products, backward twice the forward (the usual 6N + attention count, PaLM appendix B).
    The weights are the 2-D ones: the blocks and the tied output head; the position table is a lookup, not a matmul."""
    config = model.config
    b, t = batch["input_ids"].shape
    weights = sum(p.numel() for p in model.parameters() if p.ndim == 2) - config.n_positions * config.n_embd
    forward = 2 * weights * b * t + 4 * config.n_layer * b * t * t * config.n_embd
    return 3.0 * forward


def matmul_flops(dtype: torch.dtype, size: int, repeats: int = 4) -> Callable[[], float]:
    """A callable that multiplies two size x size matrices `repeats` times and returns the FLOPs done: the
    machine's practical peak for this dtype (what a training step's large matmuls could reach at best)."""
    x, y = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)

    def run() -> float:
        for _ in range(repeats):
            torch.mm(x, y)
        return 2.0 * size ** 3 * repeats

    return run


def bench_mfu(assets: Assets) -> tuple[list[Row], list[str]]:
    sizes, pad = assets.sizes, assets.bpe.pad_token_id
    batches = assets.train_batches(assets.bpe_sequences, grouped_batches(assets.bpe_lengths, sizes.batch_size), pad)
    rows, peaks = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = small_model(len(assets.bpe))
        optimizer, cycle = optimizer_for(model), itertools.cycle(batches)

        def step() -> float:
            batch = next(cycle)
            train_step(model, optimizer, batch, bf16=dtype == torch.bfloat16)
            return training_flops(model, batch)

        # Quick mode: a small product, so that the test stays quick; the real peak needs large matrices.
        size = 1024 if sizes.tweets is None else 256
        peak, achieved = interleaved(lambda: rate(matmul_flops(dtype, size)), lambda: rate(step), sizes.train_pairs)
        peaks[name] = (peak, achieved)
        rows.append(Row(f"MFU {name}: A matmul peak, B training step", peak / 1e9, achieved / 1e9, "GFLOP/s",
                        f"model FLOPs utilisation of the default model's training step ({name})"))
    (peak32, step32), (peak16, step16) = peaks["fp32"], peaks["bf16"]
    note = (f"mfu: on this CPU bf16 matmuls peak at {peak16 / peak32:.2f}x fp32's, and the bf16 step runs at "
            f"{step16 / step32:.2f}x the fp32 step (MFU {step32 / peak32:.1%} fp32, {step16 / peak16:.1%} bf16)")
    return rows, [note]


def bench_scoring(assets: Assets) -> tuple[list[Row], list[str]]:
    from alignment.scorers.cache import ScoreCache, score_with_cache
    from alignment.scorers.jigsaw_bilstm import JigsawBiLSTM

    texts = assets.corpus[:assets.sizes.score_texts]
    scorer = JigsawBiLSTM()
    with tempfile.TemporaryDirectory() as folder:
        misses = itertools.count()

        def miss() -> int:  # a fresh cache file each time: every text is scored and stored
            with ScoreCache(Path(folder) / f"miss-{next(misses)}.sqlite") as cache:
                return len(score_with_cache(scorer, texts, cache))

        with ScoreCache(Path(folder) / "hit.sqlite") as warm:
            score_with_cache(scorer, texts, warm)

            def hit() -> int:
                return len(score_with_cache(scorer, texts, warm))

            a, b = interleaved(lambda: rate(miss), lambda: rate(hit), assets.sizes.repeats)
    return [Row("scoring: A cache miss, B cache hit", a, b, "texts/s",
                f"speed-up of a cache hit (JigsawBiLSTM, {len(texts)} texts)")], []


def bench_memory(assets: Assets) -> tuple[list[Row], list[str]]:
    if not memory_measurable():
        return [], ["memory: skipped (resetting the peak RSS needs Linux's /proc/self/clear_refs)"]
    sizes, pad, lengths = assets.sizes, assets.bpe.pad_token_id, assets.bpe_lengths
    # The longest sentences: the batch that sets the peak of an epoch.
    batch = assets.batch(assets.bpe_sequences, np.argsort(-lengths, kind="stable")[:sizes.batch_size], pad)
    (fp32, fp32_opt), (bf16, bf16_opt) = _paired_models(len(assets.bpe))
    a, b = interleaved(lambda: peak_rss_growth_mib(lambda: train_step(fp32, fp32_opt, batch, bf16=False)),
                       lambda: peak_rss_growth_mib(lambda: train_step(bf16, bf16_opt, batch, bf16=True)),
                       sizes.repeats)
    return [Row("peak memory: A fp32, B bf16 autocast", a, b, "MiB",
                f"RSS growth of a train step ({batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} "
                "tokens), bf16 relative to fp32")], []


def write_copies(path: Path, tweets: int | None, copies: int) -> int:
    """The tweets `copies` times as a .jsonl corpus, every sentence of copy c ending in the word "copy<c>" so that
    dedupe keeps them all (each on its own line: a line break always ends a sentence). Returns the documents."""
    from alignment.data.sentences import split_sentences

    texts = [document["text"] for document in TweetsSource(limit=tweets)()]
    with open(path, "w") as f:
        for copy_index in range(copies):
            for text in texts:
                lines = [f"{sentence} copy{copy_index}" for sentence in split_sentences(text)]
                f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    return copies * len(texts)


# A dataset build in its own process (`python -m alignment.data`, the default experiment's data settings on a
# .jsonl corpus), printing its peak RSS (VmHWM) when it ends.
_BUILD_CHILD = """
import runpy, sys
import alignment.data.build, alignment.data.datamodule  # the imports (torch, transformers, ...): not the build's
status = lambda field: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
print("VmRSS_KiB", status("VmRSS"))
sys.argv = ["alignment.data", *sys.argv[1:]]
try:
    runpy.run_module("alignment.data", run_name="__main__")
finally:
    print("VmHWM_KiB", status("VmHWM"))
"""


def build_peak_rss_mib(corpus: Path, shard_documents: int, folder: Path) -> tuple[float, float, float]:
    """Building `corpus` in a fresh process, with its own runs folder: its RSS once the modules are imported, its
    peak RSS (MiB), and its wall time (s)."""
    overrides = ["data=files", f"data.source.paths={corpus}", f"data.shard_documents={shard_documents}",
                 # cheap scorers, so that the build's own work is not drowned by scoring: VADER and profanity-check
                 "scorer@task.attributes.toxicity.scorer=profanity", "datamodule.progress=false",
                 f"hydra.run.dir={folder / 'hydra'}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BUILD_CHILD, *overrides], capture_output=True, text=True,
                          env={**os.environ, "ALIGNMENT_RUNS_DIR": str(folder / "runs")}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the build of {corpus} failed:\n{done.stderr[-3000:]}")
    imported, peak = (int(done.stdout.split(field)[1].split()[0]) / 1024 for field in ("VmRSS_KiB", "VmHWM_KiB"))
    return imported, peak, time.perf_counter() - start


def bench_build(assets: Assets) -> tuple[list[Row], list[str]]:
    if not Path("/proc/self/status").exists():
        return [], ["build: skipped (the peak RSS is read from Linux's /proc/self/status)"]
    sizes, results = assets.sizes, {}
    with tempfile.TemporaryDirectory() as folder:
        for copies in (1, 10):
            corpus = Path(folder, f"corpus{copies}.jsonl")
            documents = write_copies(corpus, sizes.build_tweets, copies)
            results[copies] = (documents, *build_peak_rss_mib(corpus, sizes.shard_documents, Path(folder, str(copies))))
    (docs1, base1, peak1, time1), (docs10, base10, peak10, time10) = results[1], results[10]
    row = Row("build peak memory: A corpus 1x, B 10x", peak1 - base1, peak10 - base10, "MiB",
              f"peak RSS of a dataset build above its process's imports when the corpus grows "
              f"{docs10 / docs1:.0f}x ({docs1} -> {docs10} documents, shards of {sizes.shard_documents}); "
              "target far below 10")
    note = (f"build: the corpus grew {docs10 / docs1:.0f}x; the build process's peak RSS {peak10 / peak1:.2f}x "
            f"({peak1:.0f} -> {peak10:.0f} MiB, of which the imports {base1:.0f} and {base10:.0f}), its time "
            f"{time10 / time1:.1f}x ({time1:.0f} s -> {time10:.0f} s)")
    return [row], [note]


def bench_loop(assets: Assets) -> tuple[list[Row], list[str]]:
    from benchmarks.loop import lightning_vs_bare

    sizes = assets.sizes
    # The default run's data, model and trainer; quick mode only shrinks the corpus and the batch.
    quick = [] if sizes.tweets is None else [f"data.source.limit={sizes.tweets}", "datamodule.progress=false",
                                             f"datamodule.batch_size={sizes.batch_size}"]
    result = lightning_vs_bare(quick, sizes.loop_steps)
    return [Row("training: A bare PyTorch loop, B Lightning Trainer", result["bare"], result["lightning"], "tokens/s",
                f"the project's step (default trainer: logging, progress bar, callbacks) vs a plain loop, "
                f"{result['steps']} steps each, interleaved; target >= 0.97")], \
        [f"loop: both sides trained the same batches: {'yes' if result['same_batches'] else 'NO'}"]


def bench_run(assets: Assets) -> tuple[list[Row], list[str]]:
    from benchmarks.loop import training_phase_vs_bare

    sizes = assets.sizes
    # The alignment curve is taken out of the training phase (time/curve): not run here at all.
    overrides = ["eval.curve.every_n_steps=0", *sizes.run]
    if sizes.tweets is not None:
        overrides += [f"data.source.limit={sizes.tweets}", "datamodule.progress=false",
                      f"datamodule.batch_size={sizes.batch_size}"]
    result = training_phase_vs_bare(overrides)
    kinds = ", ".join(f"{name} {c['cycles']} x {c['cycle_ms']:.0f} ms ({c['share']:.1%})"
                      for name, c in result["kinds"].items())
    return [Row("training phase: A bare PyTorch loop, B the default run's training phase", result["bare"],
                result["run"], "tokens/s",
                f"fit as `python -m alignment` runs it (checkpoints, MLflow, progress bar, LR monitor, epochs), "
                f"net of validation, vs a plain loop, {result['steps']} steps each, interleaved; target >= 0.95")], \
        [f"run: both sides trained the same batches: {'yes' if result['same_batches'] else 'NO'}",
         f"run: B's cycles by kind: {kinds}; fit before the first step {result['before']:.1f} s, "
         f"after the last {result['after']:.1f} s"]


BENCHMARKS: dict[str, Callable[[Assets], tuple[list[Row], list[str]]]] = {
    "loop": bench_loop,
    "run": bench_run,
    "sampling": bench_sampling,
    "generate": bench_generate,
    "precision": bench_precision,
    "batching": bench_batching,
    "vocabulary": bench_vocabulary,
    "hf-trainer": bench_hf_trainer,
    "scoring": bench_scoring,
    "memory": bench_memory,
    "build": bench_build,
    "mfu": bench_mfu,
}


# ----------------------------------------------------------------------------------------------
# Output

def format_number(value: float) -> str:
    """At least 4 significant digits, never in scientific notation."""
    decimals = max(0, 3 - int(np.floor(np.log10(abs(value))))) if value else 0
    return f"{value:.{decimals}f}"


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: name, A, B, unit, B/A, meaning."""
    lines = ["| comparison | A | B | unit | B/A | meaning |", "|---|---:|---:|---|---:|---|"]
    lines += [f"| {r.name} | {format_number(r.a)} | {format_number(r.b)} | {r.unit} | {r.ratio:.3f} | {r.meaning} |"
              for r in rows]
    return "\n".join(lines)


def machine_facts() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    return (f"machine: {cpu}, {os.cpu_count()} cores ({usable} usable), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def run(names: Sequence[str], sizes: Sizes) -> tuple[list[Row], list[str]]:
    assets = Assets(sizes)
    rows, notes = [], []
    for name in names:
        new_rows, new_notes = BENCHMARKS[name](assets)
        rows += new_rows
        notes += new_notes
    return rows, notes


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds instead of minutes")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only this comparison (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice, one per core)")
    parser.add_argument("--run-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the `run` comparison's default run (repeatable)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, run=(*sizes.run, *args.run_override))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        print(machine_facts())
        print(f"sizes: {sizes}")
        start = time.perf_counter()
        rows, notes = run(args.only or list(BENCHMARKS), sizes)
    finally:
        torch.set_num_threads(threads)
    print()
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
