"""Capability next to alignment: how far the model moved from a reference language model.

Study A reported KL(GPT-3 || model) estimated on GPT-3 samples; GPT-3 is retired, so the reference
here is any causal LM (a hub model, or e.g. the `none` model of the same grid). The estimate is
E_{x ~ ref}[log p_ref(x) - log p_model(x)] over whole sampled texts, each model reading the text with
its own tokenizer, so the two need not share a vocabulary.
"""
from __future__ import annotations

import numpy as np
import torch

from alignment.evaluation.sampling import sample


@torch.no_grad()
def text_logprobs(model, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """log p(text, EOS | EOS) under `model`, summed over tokens, one float per text."""
    was_training = model.training
    model.eval()
    eos, out, device = tokenizer.eos_token_id, [], next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]
        seqs = [[eos] + ids + [eos] for ids in encoded]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        ids, mask = ids.to(device), mask.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        out.append(token_logp.sum(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def kl_from_reference(model, tokenizer, reference, reference_tokenizer, num_samples: int = 256,
                      max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Monte-Carlo KL(reference || model) in nats per text and per character, on reference samples
    (temperature 1: the estimate is unbiased only for samples from the reference distribution itself)."""
    eos = reference_tokenizer.eos_token_id
    pad = reference_tokenizer.pad_token_id if reference_tokenizer.pad_token_id is not None else eos
    ids = sample(reference, [[eos]] * num_samples, eos_id=eos, pad_id=pad, max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed)
    texts = [t for t in reference_tokenizer.batch_decode(ids, skip_special_tokens=True) if t.strip()]
    if not texts:
        return {"kl_from_reference": float("nan"), "kl_from_reference_per_char": float("nan")}
    gap = text_logprobs(reference, reference_tokenizer, texts) - text_logprobs(model, tokenizer, texts)
    return {"kl_from_reference": float(gap.mean()),
            "kl_from_reference_per_char": float(gap.sum() / sum(len(t) for t in texts))}
