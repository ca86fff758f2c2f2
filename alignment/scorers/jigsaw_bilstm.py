"""Jigsaw toxicity from the Keras BiLSTM shipped by `toxic-comment-classifier`, re-implemented in PyTorch.

The PyPI package (0.3.0) ships trained weights (`model/model.weights.h5`) and a pickled Keras tokenizer
(`model/tokenizer.pickle`) for the six labels of the Jigsaw Toxic Comment challenge, the labels Detoxify
'original' predicts. Its own code needs TensorFlow; this module reads the same two files with h5py and a restricted
unpickler and runs the network in torch, so it is the offline toxicity scorer.

Network (Keras names -> torch):
  Embedding(20000, 50) -> Bidirectional(LSTM(50), return_sequences) -> max over time -> Dense(100->50, relu)
  -> Dense(50->6, sigmoid). Keras stores kernels as (in, out), torch as (out, in); both order the LSTM gates
  input, forget, cell, output; Keras has one LSTM bias where torch has two, so torch's `bias_hh` is zero.
Tokenizer (Keras `Tokenizer.texts_to_sequences` + `pad_sequences`): lower-case, every `filters` character becomes
the split character, split, keep words whose index is < num_words (others dropped, no OOV token), then keep the
*last* 100 ids and left-pad with 0.
"""

from __future__ import annotations

import functools
import pickle
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alignment.assets import package_dir
from alignment.scorers.base import LOWER_IS_BETTER, Scorer, package_version

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
SEQUENCE_LENGTH = 100
VOCAB_SIZE = 20000
EMBEDDING_DIM = 50
LSTM_UNITS = 50
HIDDEN_UNITS = 50
# Bump when this re-implementation changes in a way that changes scores (it is part of the cache key).
IMPLEMENTATION_VERSION = 1


def model_dir() -> Path:
    """The package's `model/` directory, found without importing the package (its __init__ imports TensorFlow)."""
    hint = "`make setup` (pip install --no-deps toxic-comment-classifier==0.3.0)"
    return package_dir("toxic_classifier", hint) / "model"


class KerasTokenizerState:
    """Plain stand-in for `keras...text.Tokenizer`: unpickling fills its __dict__ with the pickled attributes."""


class _TokenizerUnpickler(pickle.Unpickler):
    """Unpickles the Keras tokenizer without Keras and without trusting the file.

    The Keras Tokenizer class becomes a plain attribute holder; besides it, only the containers its attributes are
    made of (OrderedDict, defaultdict(int)) may be built. Any other class in the file raises.
    """

    _KERAS_TOKENIZER_MODULES = ("keras.src.legacy.preprocessing.text", "keras.preprocessing.text",
                                "keras_preprocessing.text", "tensorflow.keras.preprocessing.text")
    _SAFE_CONTAINERS = {("collections", "OrderedDict"): OrderedDict,
                        ("collections", "defaultdict"): defaultdict,
                        ("builtins", "int"): int}

    def find_class(self, module: str, name: str):
        if name == "Tokenizer" and module in self._KERAS_TOKENIZER_MODULES:
            return KerasTokenizerState
        if (module, name) in self._SAFE_CONTAINERS:
            return self._SAFE_CONTAINERS[(module, name)]
        raise pickle.UnpicklingError(f"tokenizer.pickle refers to {module}.{name}, which is not allowed")


class KerasWordTokenizer:
    """The Keras Tokenizer's text -> padded id sequence, for word-level tokenizers without an OOV token."""

    def __init__(self, word_index: dict[str, int], filters: str, lower: bool, split: str, num_words: int):
        # Words at or past num_words are dropped by Keras, so they need not be kept.
        self.word_index = {word: index for word, index in word_index.items() if index < num_words}
        self.translation = str.maketrans({char: split for char in filters})
        self.lower = lower
        self.split = split

    @classmethod
    def from_pickle(cls, path: Path) -> "KerasWordTokenizer":
        with open(path, "rb") as handle:
            state = _TokenizerUnpickler(handle).load()
        attributes = vars(state)
        if attributes.get("char_level") or attributes.get("oov_token") is not None:
            raise ValueError("only word-level Keras tokenizers without an OOV token are supported")
        return cls(attributes["word_index"], attributes["filters"], attributes["lower"], attributes["split"],
                   attributes["num_words"])

    def words(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        return [word for word in text.translate(self.translation).split(self.split) if word]

    def ids(self, text: str) -> list[int]:
        lookup = self.word_index.get
        return [index for index in map(lookup, self.words(text)) if index is not None]

    def padded_ids(self, texts: list[str], length: int = SEQUENCE_LENGTH) -> np.ndarray:
        """(len(texts), length) int64; long texts keep their last `length` ids, short ones are left-padded with 0."""
        batch = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-length:]
            if ids:
                batch[row, length - len(ids):] = ids
        return batch


class BiLSTMToxicityNet(nn.Module):
    """The Keras network in torch: returns the six sigmoid probabilities per sequence."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
        self.lstm = nn.LSTM(EMBEDDING_DIM, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.hidden = nn.Linear(2 * LSTM_UNITS, HIDDEN_UNITS)
        self.output = nn.Linear(HIDDEN_UNITS, len(LABELS))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(token_ids))
        pooled = states.max(dim=1).values  # Keras runs over the padding too, so the pool includes it
        return torch.sigmoid(self.output(torch.relu(self.hidden(pooled))))

    @classmethod
    def from_keras_weights(cls, path: Path) -> "BiLSTMToxicityNet":
        import h5py  # only needed to load

        net = cls()
        with h5py.File(path, "r") as weights:
            def tensor(name: str, transpose: bool = False) -> torch.Tensor:
                array = np.asarray(weights[f"layers/{name}"], dtype=np.float32)
                return torch.from_numpy(array.T.copy() if transpose else array)

            state = {"embedding.weight": tensor("embedding/vars/0")}
            for keras_direction, torch_suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
                cell = f"bidirectional/{keras_direction}/cell/vars"
                state[f"lstm.weight_ih_l0{torch_suffix}"] = tensor(f"{cell}/0", transpose=True)
                state[f"lstm.weight_hh_l0{torch_suffix}"] = tensor(f"{cell}/1", transpose=True)
                state[f"lstm.bias_ih_l0{torch_suffix}"] = tensor(f"{cell}/2")
                state[f"lstm.bias_hh_l0{torch_suffix}"] = torch.zeros(4 * LSTM_UNITS)
            state["hidden.weight"] = tensor("dense/vars/0", transpose=True)
            state["hidden.bias"] = tensor("dense/vars/1")
            state["output.weight"] = tensor("dense_1/vars/0", transpose=True)
            state["output.bias"] = tensor("dense_1/vars/1")
        net.load_state_dict(state)
        return net.eval()


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> KerasWordTokenizer:
    """Loaded once per process (the pickle holds 210k words and takes about a second)."""
    return KerasWordTokenizer.from_pickle(model_dir() / "tokenizer.pickle")


@functools.lru_cache(maxsize=1)
def load_net() -> BiLSTMToxicityNet:
    """Loaded once per process and shared by every JigsawBiLSTM instance (it is never trained)."""
    net = BiLSTMToxicityNet.from_keras_weights(model_dir() / "model.weights.h5")
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


class JigsawBiLSTM(Scorer):
    """Probability of one Jigsaw label (default `toxic`) from the offline BiLSTM. Lower is better, range [0, 1]."""

    name = "jigsaw_bilstm"
    better = LOWER_IS_BETTER
    low = 0.0
    high = 1.0

    def __init__(self, label: str = "toxic", batch_size: int = 256, num_threads: int | None = None):
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        self.label = label
        self.batch_size = batch_size
        self.num_threads = num_threads

    def settings(self) -> dict:
        return {"label": self.label, "package": package_version("toxic-comment-classifier"),
                "implementation": IMPLEMENTATION_VERSION}

    def all_labels(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 6) probabilities, columns in the order of LABELS."""
        tokenizer, net = load_tokenizer(), load_net()
        previous_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            batches = []
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    ids = torch.from_numpy(tokenizer.padded_ids(texts[start:start + self.batch_size]))
                    batches.append(net(ids).double().numpy())
        finally:
            torch.set_num_threads(previous_threads)
        return np.concatenate(batches) if batches else np.zeros((0, len(LABELS)))

    def score(self, texts: list[str]) -> np.ndarray:
        return self.all_labels(list(texts))[:, LABELS.index(self.label)]
