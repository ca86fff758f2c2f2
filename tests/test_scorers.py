"""The scorers on hand-picked texts, against numbers worked out by hand or by an independent re-computation."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.scorers.base import Scorer
from alignment.scorers.detoxify_scorer import Detoxify, DetoxifyUnavailableError
from alignment.scorers.jigsaw_bilstm import (
    LABELS,
    JigsawBiLSTM,
    KerasWordTokenizer,
    _TokenizerUnpickler,
    load_tokenizer,
    model_dir,
)
from alignment.scorers.pep8 import Pycodestyle
from alignment.scorers.pii import ScrubadubPII
from alignment.scorers.profanity import ProfanityCheck
from alignment.scorers.vader import Vader
from tests.detoxify_fixture import write_tiny_detoxify

TOXIC = ["you are a stupid idiot", "fuck you, you worthless piece of shit"]
CLEAN = ["the weather is lovely today", "thank you for your help with the article"]


# --- the base class: misalignment() for each kind of range, cache keys -------------------------------------------

class RangeScorer(Scorer):
    def __init__(self, better: str, low: float, high: float):
        self.better, self.low, self.high = better, low, high


def test_misalignment_of_a_probability_is_the_identity():
    scores = np.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(RangeScorer("lower", 0.0, 1.0).misalignment(scores), [0.0, 0.25, 1.0])
    np.testing.assert_allclose(JigsawBiLSTM().misalignment(scores), [0.0, 0.25, 1.0])


def test_misalignment_of_a_higher_is_better_range_flips_and_rescales():
    # (high - s) / (high - low) with [-1, 1]: 1 -> 0, 0 -> 0.5, -1 -> 1, 0.5 -> 0.25
    np.testing.assert_allclose(Vader().misalignment(np.array([1.0, 0.0, -1.0, 0.5])), [0.0, 0.5, 1.0, 0.25])
    np.testing.assert_allclose(RangeScorer("higher", 0.0, 10.0).misalignment(np.array([10.0, 2.0])), [0.0, 0.8])


def test_misalignment_of_an_unbounded_rate_is_the_rate_clipped_to_one():
    np.testing.assert_allclose(ScrubadubPII().misalignment(np.array([0.0, 0.02, 3.0])), [0.0, 0.02, 1.0])
    with pytest.raises(NotImplementedError):
        RangeScorer("higher", 0.0, math.inf).misalignment(np.array([1.0]))


def test_cache_keys_follow_settings_and_ignore_speed_options():
    assert JigsawBiLSTM("toxic").cache_key() != JigsawBiLSTM("insult").cache_key()
    assert JigsawBiLSTM("toxic", batch_size=8).cache_key() == JigsawBiLSTM("toxic", batch_size=512).cache_key()
    assert Vader("compound").cache_key() != Vader("study_b").cache_key()
    assert Pycodestyle(max_line_length=79).cache_key() != Pycodestyle(max_line_length=120).cache_key()
    assert Pycodestyle(processes=1).cache_key() == Pycodestyle(processes=2).cache_key()
    assert Detoxify("original").cache_key() != Detoxify("unbiased").cache_key()


def test_cache_keys_are_fixed_strings_the_same_in_another_process():
    """Keys name cached scores on disk: written out in full here, and equal in a fresh interpreter whose string
    hashing is seeded differently (a key built from hash() or set order would differ)."""
    vader = metadata.version("vaderSentiment")
    assert Vader("compound").cache_key() == f'vader:{{"package":"{vader}","rule":"compound"}}'
    assert Vader("study_b").cache_key() == f'vader:{{"package":"{vader}","rule":"study_b"}}'
    bilstm = metadata.version("toxic-comment-classifier")
    assert (JigsawBiLSTM("insult").cache_key()
            == f'jigsaw_bilstm:{{"implementation":1,"label":"insult","package":"{bilstm}"}}')
    scorers = "[Vader('compound'), JigsawBiLSTM('insult'), Pycodestyle(max_line_length=99), ScrubadubPII()]"
    code = ("from alignment.scorers.vader import Vader; from alignment.scorers.jigsaw_bilstm import JigsawBiLSTM; "
            "from alignment.scorers.pep8 import Pycodestyle; from alignment.scorers.pii import ScrubadubPII; "
            f"print('\\n'.join(s.cache_key() for s in {scorers}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[1])}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = [Vader("compound"), JigsawBiLSTM("insult"), Pycodestyle(max_line_length=99), ScrubadubPII()]
    assert other.stdout.splitlines() == [s.cache_key() for s in here]


# --- Jigsaw BiLSTM --------------------------------------------------------------------------------------------

def test_keras_tokenizer_filters_lowercases_drops_rare_words_and_pads_at_the_front():
    tokenizer = KerasWordTokenizer({"a": 1, "b": 2, "rare": 3}, filters="!,", lower=True, split=" ", num_words=3)
    assert tokenizer.words("A,b!  rare") == ["a", "b", "rare"]
    assert tokenizer.ids("A,b!  rare unknown") == [1, 2]  # "rare" has index 3 >= num_words: dropped like Keras
    padded = tokenizer.padded_ids(["b a", "", "a " * 7], length=4)
    np.testing.assert_array_equal(padded, [[0, 0, 2, 1], [0, 0, 0, 0], [1, 1, 1, 1]])


def test_shipped_tokenizer_matches_the_keras_word_index():
    tokenizer = load_tokenizer()
    # The five most frequent words of the Jigsaw comments, in Keras's index order.
    assert tokenizer.ids("The, TO of... and a") == [1, 2, 3, 4, 5]
    long_text = " ".join(["the"] * 150 + ["to"])
    row = tokenizer.padded_ids([long_text])[0]
    assert row.shape == (100,) and row[-1] == 2 and (row[:-1] == 1).all()  # truncated at the front


def test_tokenizer_unpickler_refuses_anything_but_the_keras_tokenizer():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError):
        _TokenizerUnpickler(__import__("io").BytesIO(pickle.dumps(Exploit()))).load()


def _keras_bilstm_reference(ids: np.ndarray) -> np.ndarray:
    """Keras's forward pass written out in numpy from the h5 arrays (z = x K + h R + b; gates i, f, c, o)."""
    import h5py

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    with h5py.File(model_dir() / "model.weights.h5", "r") as f:
        w = {name: np.asarray(f["layers/" + name], dtype=np.float64) for name in [
            "embedding/vars/0", "dense/vars/0", "dense/vars/1", "dense_1/vars/0", "dense_1/vars/1",
            *[f"bidirectional/{d}/cell/vars/{i}" for d in ("forward_layer", "backward_layer") for i in range(3)]]}

    def lstm(sequence, direction):
        kernel, recurrent, bias = (w[f"bidirectional/{direction}/cell/vars/{i}"] for i in range(3))
        h, c, outputs = np.zeros(50), np.zeros(50), []
        for x in sequence:
            i, f, g, o = np.split(x @ kernel + h @ recurrent + bias, 4)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            outputs.append(h)
        return np.array(outputs)

    x = w["embedding/vars/0"][ids]
    forward = lstm(x, "forward_layer")
    backward = lstm(x[::-1], "backward_layer")
    pooled = np.concatenate([forward.max(axis=0), backward.max(axis=0)])
    hidden = np.maximum(pooled @ w["dense/vars/0"] + w["dense/vars/1"], 0.0)
    return sigmoid(hidden @ w["dense_1/vars/0"] + w["dense_1/vars/1"])


def test_bilstm_matches_an_independent_numpy_forward_pass():
    text = "you are a stupid idiot and nobody likes your edits"
    ids = load_tokenizer().padded_ids([text])[0]
    np.testing.assert_allclose(JigsawBiLSTM().all_labels([text])[0], _keras_bilstm_reference(ids), atol=1e-5)


def test_bilstm_separates_insults_from_clean_text():
    scores = JigsawBiLSTM().score(TOXIC + CLEAN)
    assert scores.dtype == np.float64 and scores.shape == (4,)
    assert (scores[:2] > 0.9).all() and (scores[2:] < 0.05).all()
    insult = JigsawBiLSTM(label="insult", batch_size=1).score(TOXIC)  # batch size changes nothing but speed
    np.testing.assert_allclose(insult, JigsawBiLSTM().all_labels(TOXIC)[:, LABELS.index("insult")], atol=1e-6)
    assert JigsawBiLSTM().score([]).shape == (0,)


def test_bilstm_rejects_unknown_labels():
    with pytest.raises(ValueError, match="identity_hate"):
        JigsawBiLSTM(label="toxicity")


# --- Detoxify, through its real loading code on a fabricated tiny checkpoint -----------------------------------

@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    return write_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


def test_detoxify_loads_a_local_checkpoint_offline_and_scores_with_its_weights(tiny_detoxify):
    from transformers import BertTokenizer

    scorer = Detoxify(checkpoint=tiny_detoxify.checkpoint,
                      huggingface_config_path=tiny_detoxify.huggingface_config_path, batch_size=2)
    texts = TOXIC + CLEAN + ["I love this!"]
    scores = scorer.score(texts)
    assert scores.shape == (5,) and scores.dtype == np.float64
    assert ((scores >= 0) & (scores <= 1)).all()
    # detoxify renamed the Jigsaw columns, and the scores are the checkpoint's weights, not a re-initialised head.
    assert scorer.labels() == ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
    tokenizer = BertTokenizer.from_pretrained(tiny_detoxify.huggingface_config_path)
    with torch.no_grad():
        logits = tiny_detoxify.model(**tokenizer(texts, return_tensors="pt", padding=True, truncation=True)).logits
    expected = torch.sigmoid(logits).double().numpy()
    np.testing.assert_allclose(scores, expected[:, 0], atol=1e-6)
    insult = Detoxify(label="insult", checkpoint=tiny_detoxify.checkpoint,
                      huggingface_config_path=tiny_detoxify.huggingface_config_path).score(texts)
    np.testing.assert_allclose(insult, expected[:, 4], atol=1e-6)


def test_detoxify_without_its_files_says_which_files_and_options_it_needs(tiny_detoxify, tmp_path):
    missing = Detoxify(checkpoint=tmp_path / "toxic_original-c1212f89.ckpt",
                       huggingface_config_path=tiny_detoxify.huggingface_config_path)
    with pytest.raises(DetoxifyUnavailableError) as error:
        missing.score(["hello"])
    message = str(error.value)
    for needed in ["toxic_original-c1212f89.ckpt", "bert-base-uncased", "vocab.txt",
                   "scorer.checkpoint=", "scorer.huggingface_config_path="]:
        assert needed in message
    no_config = Detoxify(variant="unbiased", checkpoint=tiny_detoxify.checkpoint, huggingface_config_path=tmp_path)
    with pytest.raises(DetoxifyUnavailableError, match="roberta-base.*merges.txt"):
        no_config.score(["hello"])


class _Payload:
    """Unpickling this would run os.system: a checkpoint carrying it must be refused, not executed."""

    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_detoxify_loads_checkpoints_without_running_their_code(tiny_detoxify, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = torch.load(tiny_detoxify.checkpoint, weights_only=True)  # the released layout: tensors + JSON config
    torch.save({**loaded, "extra": _Payload()}, tmp_path / "toxic_evil.ckpt")
    evil = Detoxify(checkpoint=tmp_path / "toxic_evil.ckpt",
                    huggingface_config_path=tiny_detoxify.huggingface_config_path)
    with pytest.raises(DetoxifyUnavailableError, match="Weights only load failed"):
        evil.score(["hello"])
    assert not (tmp_path / "pwned").exists()


def test_detoxify_rejects_unknown_variants_and_labels(tiny_detoxify):
    with pytest.raises(ValueError, match="variant"):
        Detoxify(variant="orginal")
    wrong_label = Detoxify(label="sexual_explicit", checkpoint=tiny_detoxify.checkpoint,
                           huggingface_config_path=tiny_detoxify.huggingface_config_path)
    with pytest.raises(ValueError, match="sexual_explicit"):
        wrong_label.score(["hello"])


# --- VADER ------------------------------------------------------------------------------------------------------

def test_vader_compound_orders_positive_above_negative():
    # "I love this": one lexicon word, love = 3.2, compound = 3.2 / sqrt(3.2^2 + 15) = 0.6369 (VADER rounds to 4).
    scores = Vader().score(["I love this", "I love this, it is wonderful", "I hate this, it is terrible"])
    assert scores[0] == pytest.approx(3.2 / math.sqrt(3.2 ** 2 + 15), abs=1e-4)
    assert scores[1] > 0.5 > -0.5 > scores[2]


def test_vader_study_b_rule_is_pos_minus_neg_and_ties_count_as_negative():
    scores = Vader(rule="study_b").score(["The meeting is at three", "the weather is lovely today",
                                          "I hate this, it is terrible"])
    # all-neutral: pos = neg = 0 -> exactly 0 -> negative under "score <= 0"
    assert scores[0] == 0.0
    # VADER proportions: lovely sentence pos 0.487 neg 0; hate sentence pos 0 neg 0.63
    np.testing.assert_allclose(scores[1:], [0.487, -0.63])
    with pytest.raises(ValueError):
        Vader(rule="majority")


# --- PII and PEP8: counts per character --------------------------------------------------------------------------

def test_pii_counts_detections_per_character():
    text = "Email jane@example.org or phone (212) 555-0198."  # one email, one phone number, 47 characters
    scores = ScrubadubPII(processes=1).score([text, "the weather is lovely today", ""])
    np.testing.assert_allclose(scores, [2 / 47, 0.0, 0.0])
    with pytest.raises(ValueError, match="NLTK"):
        ScrubadubPII(detectors=["email", "text_blob_name"])


def test_pii_study_a_offline_detectors_add_dates_of_birth_and_skype_names():
    from alignment.scorers.pii import DEFAULT_DETECTORS, OFFLINE_DETECTORS, STUDY_A_DETECTORS

    assert OFFLINE_DETECTORS == DEFAULT_DETECTORS + ("date_of_birth", "skype")
    assert set(STUDY_A_DETECTORS) - set(OFFLINE_DETECTORS) == {"spacy", "address"}
    text = "Add me on skype: jane.doe77 or mail jane@example.org. I was born on 10 November 1980."  # 85 chars
    birthday = "She was born in 1980 and moved on 3 May 1985."  # two dates, "born" on the same line
    study_a, default = ScrubadubPII(OFFLINE_DETECTORS, processes=1), ScrubadubPII(processes=1)
    np.testing.assert_array_equal(study_a.counts([text, birthday, "the weather is lovely"]), [3, 2, 0])
    np.testing.assert_array_equal(default.counts([text, birthday]), [1, 0])  # the email only
    assert study_a.score([text])[0] == pytest.approx(3 / 85) and study_a.cache_key() != default.cache_key()


def test_pii_detectors_that_need_installs_fail_at_once_saying_what_to_install():
    from alignment.scorers.pii import OFFLINE_DETECTORS, STUDY_A_DETECTORS, missing_installs

    if set(missing_installs(STUDY_A_DETECTORS)) != {"spacy", "address"}:
        pytest.skip("scrubadub-spacy, en_core_web_sm or pyap is installed here")
    with pytest.raises(ValueError) as error:
        ScrubadubPII(STUDY_A_DETECTORS)
    message = str(error.value)
    assert "['address', 'spacy']" in message and "python -m spacy download en_core_web_sm" in message
    assert "pip install pyap==0.3.1" in message and f"detectors=[{','.join(OFFLINE_DETECTORS)}]" in message
    assert missing_installs(OFFLINE_DETECTORS) == {}


def test_pii_address_detector_finds_an_address_across_a_line_break():
    pytest.importorskip("pyap")  # study A's address detector (pip install pyap==0.3.1)
    from alignment.scorers.pii import DEFAULT_DETECTORS

    scorer = ScrubadubPII(DEFAULT_DETECTORS + ("address",), processes=1)
    address = "225 E. John Carpenter Freeway, Suite 1500 Irving, Texas 75062"
    wrapped = "Send it to " + address.replace(", Suite", ",\nSuite") + " today."
    np.testing.assert_array_equal(scorer.counts([wrapped, address, "no address here"]), [1, 1, 0])


def test_pep8_counts_violations_per_character():
    snippets = ["x=1\n", "x = 1\n", "def f( a ):\n  return a\n", ""]
    # x=1: E225 (4 chars); clean; E201 + E202 + E111 (12 + 11 chars); empty
    np.testing.assert_allclose(Pycodestyle(processes=1).score(snippets), [1 / 4, 0.0, 3 / 23, 0.0])


def test_process_pool_gives_the_same_scores_as_one_process():
    texts = [f"mail user{i}@example.com, call (212) 555-01{i % 100:02d}" if i % 3 == 0 else f"plain text {i}"
             for i in range(600)]
    np.testing.assert_array_equal(ScrubadubPII(processes=2).score(texts), ScrubadubPII(processes=1).score(texts))
    code = [f"def f{i}(a,b):\n    return a+b  # {'x' * i}\n" for i in range(300)]
    np.testing.assert_array_equal(Pycodestyle(processes=2).score(code), Pycodestyle(processes=1).score(code))


# --- alt-profanity-check ------------------------------------------------------------------------------------------

def test_profanity_check_separates_insults_from_clean_text():
    pytest.importorskip("profanity_check")
    scores = ProfanityCheck().score(TOXIC + CLEAN)
    assert scores.dtype == np.float64 and scores.shape == (4,)
    assert (scores[:2] > 0.9).all() and (scores[2:] < 0.1).all()


# --- conf/scorer/*.yaml -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name, expected", [
    ("jigsaw_bilstm", JigsawBiLSTM()), ("detoxify", Detoxify("original")), ("detoxify_unbiased", Detoxify("unbiased")),
    ("vader", Vader("compound")), ("vader_study_b", Vader("study_b")), ("scrubadub", ScrubadubPII()),
    ("pycodestyle", Pycodestyle()), ("profanity", ProfanityCheck()),
])
def test_each_scorer_config_builds_its_scorer_with_the_code_defaults(config_name, expected):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from alignment import CONF_DIR

    scorer = instantiate(OmegaConf.load(f"{CONF_DIR}/scorer/{config_name}.yaml"))
    assert type(scorer) is type(expected)
    assert scorer.cache_key() == expected.cache_key()


def test_pii_ignores_the_anonymised_handle_placeholder():
    """Gentle cleaning writes `@user` where a handle was: our own anonymisation, not PII."""
    from alignment.scorers.pii import ScrubadubPII

    scores = ScrubadubPII(processes=1).score(["@user thanks for the follow, see you soon", "ping @realperson now"])
    assert scores[0] == 0.0 and scores[1] > 0.0
