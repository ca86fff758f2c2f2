"""A tiny fabricated Detoxify checkpoint in the released layout, for exercising detoxify's real loading code offline.

`write_tiny_detoxify(directory)` writes
  - `<directory>/tiny-bert/`: a base-model directory like a local copy of bert-base-uncased (config.json without a
    classification head size, vocab.txt, tokenizer_config.json), and
  - `<directory>/toxic_tiny-0000000.ckpt`: `{"state_dict", "config"}` as Detoxify's releases are, whose
    `config["arch"]["args"]["model_type"]` is the hub id "bert-base-uncased" exactly as in the real 'original'
    checkpoint, so loading works offline only if the local directory is used in its place.
The weights are random (seeded): the scores mean nothing, but they must equal the fabricated model's own output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Detoxify 'original' is trained on the Jigsaw 2018 columns (detoxify renames them when loading).
ORIGINAL_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["you", "are", "a", "stupid", "idiot", "the", "weather", "is", "lovely", "today", "i", "love", "this",
         "hate", "it", ".", ",", "!", "##s", "##ly"]
MAX_POSITIONS = 32


@dataclass
class TinyDetoxify:
    checkpoint: Path               # the .ckpt file
    huggingface_config_path: Path  # the base-model directory (config + tokenizer)
    model: torch.nn.Module         # the model whose state_dict the checkpoint holds
    classes: list[str]


def tiny_bert_config(vocab_size: int, num_labels: int | None = None):
    from transformers import BertConfig

    extra = {} if num_labels is None else {"num_labels": num_labels}
    return BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=MAX_POSITIONS, **extra)


def write_tiny_detoxify(directory: Path, classes: list[str] = ORIGINAL_CLASSES, seed: int = 0) -> TinyDetoxify:
    from transformers import BertForSequenceClassification

    directory = Path(directory)
    base = directory / "tiny-bert"
    base.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + WORDS
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (base / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": MAX_POSITIONS}), encoding="utf-8")
    tiny_bert_config(len(vocab)).save_pretrained(base)

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(len(vocab), num_labels=len(classes))).eval()
    checkpoint = directory / "toxic_tiny-0000000.ckpt"
    torch.save({
        "state_dict": model.state_dict(),
        "config": {
            "arch": {"args": {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
                              "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}},
            "dataset": {"args": {"classes": list(classes)}},
        },
    }, checkpoint)
    return TinyDetoxify(checkpoint, base, model, list(classes))
