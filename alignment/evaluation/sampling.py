"""Seeded, batched sampling from a Hugging Face causal LM, with the knobs both studies evaluate with.

One hand-written loop instead of `model.generate`, so that every rule is visible and testable: the KV cache,
left padding, control tokens that must never be generated, EOS held back until `min_new_tokens`, no-repeat n-grams,
and classifier-free guidance (Sanchez et al. 2023, https://arxiv.org/abs/2306.17806). Not transformers'
`LogitsProcessor`s: their top-p sorts with torch.sort (the sort below made sampling 2.5x `generate`, not 0.9x), their
n-gram ban counts the prompt and its padding, the rest are one line each here, and they need every row's whole
sequence, which this loop does not keep once the cache holds it. `tests/test_bench.py` checks that greedy decoding
gives `generate`'s tokens.

Reproducibility: each prompt owns a random generator seeded from (seed, global prompt index) and draws one uniform
number from it per step (all of them at the start of its batch), so a prompt's sample depends only on its own tokens --
not on batch_size nor on which prompts share its batch (up to float rounding differences of the batched forward pass).
"""
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class _Rules:
    eos_id: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    blocked_ids: tuple[int, ...]
    no_repeat_ngram_size: int
    no_repeat_ngram_prompt: bool
    guidance_scale: float


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
           min_new_tokens: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           blocked_ids: Sequence[int] = (), no_repeat_ngram_size: int = 0, no_repeat_ngram_prompt: bool = False,
           guidance_scale: float = 1.0, uncond_prompts: list[list[int]] | None = None,
           batch_size: int = 32, seed: int = 0) -> list[list[int]]:
    """Sample a continuation of every prompt; return only the generated ids, cut before EOS.

    temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off. no_repeat_ngram_size looks at the
    generated tokens only (the prompt may share n-grams with the continuation), so n=1 means that no token repeats
    within the continuation; with no_repeat_ngram_prompt the prompt's n-grams are banned too, as Hugging Face's
    `generate` does (study B's setting). A leading EOS is not part of that history: it marks the start of text here,
    where study B's prompts had no such token, and banning it would keep every sample from ending.
    With guidance_scale g != 1, `uncond_prompts` run as a second stream in the same forward pass and the next-token
    log-probs are l_uncond + g * (l_cond - l_uncond); g = 1 skips that stream (it would compute plain conditioning
    anyway). A row whose every token is blocked ends (as if it emitted EOS).
    `pad_id` only fills the left padding, which the attention mask hides. `seed` must be >= 0.
    """
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (use [eos_id] for unconditional samples)")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or no_repeat_ngram_size < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, no_repeat_ngram_size >= 0")
    if max_new_tokens < 0 or min_new_tokens < 0 or batch_size < 1 or seed < 0:
        raise ValueError("need max_new_tokens >= 0, min_new_tokens >= 0, batch_size >= 1, seed >= 0")
    guided = guidance_scale != 1.0
    if guided and (uncond_prompts is None or len(uncond_prompts) != len(prompts)):
        raise ValueError("guidance_scale != 1 needs one unconditional prompt per prompt")
    rules = _Rules(eos_id, min_new_tokens, temperature, top_p, top_k, tuple(blocked_ids), no_repeat_ngram_size,
                   bool(no_repeat_ngram_prompt), guidance_scale)
    was_training = model.training
    model.eval()
    try:
        samples = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            uncond = uncond_prompts[start:start + batch_size] if guided else []
            samples += _sample_batch(model, batch, uncond, start, rules, pad_id, max_new_tokens, seed)
        return samples
    finally:
        model.train(was_training)


def _sample_batch(model, prompts, uncond_prompts, first_index, rules, pad_id, max_new_tokens, seed):
    n = len(prompts)
    device = next(model.parameters()).device
    # Conditioned rows first, then their unconditioned twins: one forward pass serves both streams.
    ids, mask = _left_pad(prompts + uncond_prompts, pad_id, device)
    # Positions count real tokens only, so a left-padded prompt sees exactly the positions it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Every prompt's uniforms for all steps at once: one torch.rand call per prompt instead of one per prompt and step
    # (the same numbers: a generator's stream does not depend on how it is cut into calls).
    uniforms = torch.stack([_prompt_uniforms(seed, first_index + row, max_new_tokens) for row in range(n)])
    # Only the last position's logits are needed; a 50k vocabulary over a whole prompt batch is costly.
    parameters = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers 5 renamed past_key_values to cache (the old name warns at every step and goes in 5.40).
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    generated = [[] for _ in range(n)]
    # What the n-gram ban looks at besides the generated tokens: the prompt (without its leading EOS) or nothing.
    history = [p[1:] if p[0] == rules.eos_id else list(p) for p in prompts] if rules.no_repeat_ngram_prompt \
        else [[] for _ in range(n)]
    alive = list(range(n))  # prompts still generating, in the order of the batch's (first-stream) rows
    cache = None
    for step in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_name: cache}, **extra)
        cache = out[cache_name]
        logprobs = out.logits[:, -1].float().log_softmax(-1)
        if uncond_prompts:
            cond, uncond = logprobs[: len(alive)], logprobs[len(alive):]
            logprobs = uncond + rules.guidance_scale * (cond - uncond)
            # A token that both streams rule out (-inf - -inf = nan) stays ruled out.
            logprobs = logprobs.masked_fill(logprobs.isnan(), -torch.inf)
        rows = [history[i] + generated[i] for i in alive] if rules.no_repeat_ngram_size else []
        tokens = _draw(_allowed_scores(logprobs, rows, step, rules), uniforms[alive, step], rules).tolist()
        keep = [k for k, token in enumerate(tokens) if token != rules.eos_id]
        for k in keep:
            generated[alive[k]].append(tokens[k])
        if not keep:
            break
        if len(keep) < len(alive):
            # Finished prompts leave the batch (and the cache), so the rest no longer pay for them; each prompt's
            # own random stream makes its sample independent of who else is in the batch.
            index = torch.tensor(keep + ([k + len(alive) for k in keep] if uncond_prompts else []), device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            alive, tokens = [alive[k] for k in keep], [tokens[k] for k in keep]
        # Both streams append the same token; the cache already holds everything before it.
        ids = torch.tensor(tokens * (2 if uncond_prompts else 1), device=device)[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return generated


def _left_pad(sequences, pad_id, device):
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
    return ids.to(device), mask.to(device)


def _prompt_uniforms(seed, index, steps):
    """The `steps` uniform numbers in [0, 1) of prompt `index`'s own random stream."""
    # Mix (seed, index) instead of adding them: seed + index would give (seed 0, prompt 1) and (seed 1, prompt 0)
    # the same random stream.
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.rand(steps, generator=torch.Generator().manual_seed(int(state)))


def _allowed_scores(logprobs, generated, step, rules):
    """Set the log-prob of every token that may not come next to -inf, in place (`logprobs` is this step's own)."""
    scores = logprobs
    if step < rules.min_new_tokens:
        scores[:, rules.eos_id] = -torch.inf
    if rules.blocked_ids:
        scores[:, list(rules.blocked_ids)] = -torch.inf
    if rules.no_repeat_ngram_size:
        for row, tokens in enumerate(generated):
            scores[row, _ngram_completions(tokens, rules.no_repeat_ngram_size)] = -torch.inf
    exhausted = scores.amax(-1) == -torch.inf  # log-probs are never +inf nor nan (guidance's nans are -inf by now)
    scores[exhausted, rules.eos_id] = 0.0
    return scores


def _ngram_completions(tokens, n):
    """Tokens that would complete an n-gram already present in `tokens` (for n = 1: every token seen)."""
    if len(tokens) < n - 1:
        return []
    prefix = tokens[len(tokens) - n + 1:]
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == prefix]


def _draw(scores, uniform, rules):
    """Greedy, or a draw from softmax(scores / T) restricted by top-k and top-p."""
    if rules.temperature == 0:
        return scores.argmax(-1)
    scores = scores / rules.temperature
    if rules.top_k:
        kth_best = scores.topk(min(rules.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, -torch.inf)
    probs, order = _nucleus(scores.softmax(-1), rules.top_p)
    # Inverse-CDF draw with one uniform number per prompt from that prompt's own stream (a shared
    # torch.multinomial stream would tie a prompt's sample to its batch companions).
    uniform = uniform.to(probs.device)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).clamp_max(probs.shape[-1] - 1)
    return order.gather(-1, picked).squeeze(-1)


def _nucleus(probs, top_p):
    """The tokens to draw from, most likely first, and their probabilities (zero outside the nucleus).

    The nucleus keeps the most likely tokens until their mass reaches top_p (the best token always stays).
    """
    if top_p >= 1:
        return probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    top, order = _sorted_descending(probs)
    outside = (top.cumsum(-1) - top) >= top_p
    return top.masked_fill(outside, 0.0), order


def _sorted_descending(probs):
    """`probs` sorted along the last axis, largest first, ties in token order, and the token ids in that order.

    Sorting the vocabulary is the costliest part of a sampling step after the forward pass (an untrained model's
    nucleus holds most of it). A non-negative float32's bits order like its value, so each probability and its
    token id pack into one int64 key, and numpy's SIMD sort orders those ~10x faster than torch.sort on CPU.
    The keys are unique, so the order is fully determined (torch.sort leaves ties in any order).
    """
    bits = probs.float().view(torch.int32).long() & 0x7FFFFFFF  # & drops the sign of a -0.0
    ids = torch.arange(probs.shape[-1], device=probs.device)
    keys = (-bits << 32) | ids  # ascending keys: descending probability, then ascending id
    keys = torch.from_numpy(np.sort(keys.numpy(), axis=-1)) if keys.device.type == "cpu" else keys.sort(-1).values
    order = keys & 0xFFFFFFFF
    return probs.gather(-1, order), order
