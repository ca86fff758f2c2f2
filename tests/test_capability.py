"""KL from a reference model, on tiny real models."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from alignment.evaluation.capability import kl_from_reference, text_logprobs
from alignment.tokenizer import add_control_tokens, gpt2_tokenizer_offline


@pytest.fixture(scope="module")
def tokenizer():
    tok = gpt2_tokenizer_offline()
    add_control_tokens(tok, [])
    return tok


def tiny(seed: int, vocab: int):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=64)).eval()


def test_text_logprobs_match_a_manual_sum(tokenizer):
    model = tiny(0, len(tokenizer))
    texts = ["Hello world", "A longer sentence, with a comma."]
    got = text_logprobs(model, tokenizer, texts, batch_size=1)
    batched = text_logprobs(model, tokenizer, texts, batch_size=2)  # padding must not change anything
    for text, value, value_b in zip(texts, got, batched):
        ids = [tokenizer.eos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        manual = sum(float(logp[i, t]) for i, t in enumerate(ids[1:]))
        assert value == pytest.approx(manual, abs=1e-4) and value_b == pytest.approx(manual, abs=1e-4)


def test_kl_is_zero_against_itself_and_positive_against_another(tokenizer):
    reference = tiny(0, len(tokenizer))
    same = kl_from_reference(reference, tokenizer, reference, tokenizer, num_samples=8, max_new_tokens=6)
    assert same["kl_from_reference"] == pytest.approx(0.0, abs=1e-5)
    peaked = tiny(1, len(tokenizer))
    with torch.no_grad():  # a sharply peaked model: far from the near-uniform reference
        peaked.transformer.wte.weight.mul_(50)
    other = kl_from_reference(peaked, tokenizer, reference, tokenizer, num_samples=16, max_new_tokens=6)
    assert other["kl_from_reference"] > 1.0 and math.isfinite(other["kl_from_reference_per_char"])
