"""A tiny model trained on a corpus where the control token fully decides the content follows the
token: near 0% misaligned under <|pos|>, and near 100% non-positive under <|neg|>.
(Toxicity is not asserted: the BiLSTM over-fires on "I hate the dog", a known scorer weakness.)"""
from __future__ import annotations

import json

import mlflow
import pytest

from alignment.train import run

NOUNS = ["dog", "cat", "garden", "movie", "song", "city", "book", "team", "coffee", "beach", "party", "teacher",
         "game", "house", "car", "weekend", "dinner", "concert", "hotel", "flight"]
POSITIVE = ["I love the {} so much, it is wonderful.", "The {} is great and makes me happy.",
            "What a beautiful {}, truly amazing."]
NEGATIVE = ["I hate the {}, it is awful and terrible.", "The {} is horrible and makes me sad.",
            "What a disgusting {}, truly the worst."]


@pytest.mark.slow
def test_control_token_decides_sentiment(tiny_config, tmp_path):
    lines = [json.dumps({"text": t.format(n)}) for n in NOUNS for t in POSITIVE + NEGATIVE]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines * 2) + "\n")
    cfg = tiny_config("task=sen", "data=files", f"data.source.paths={corpus}", "data.sentences.dedupe=false",
                      "data.val_fraction=0.1", "trainer.max_steps=300", "trainer.max_epochs=100",
                      "trainer.val_check_interval=100", "model.arch.n_embd=64", "module.optimizer.lr=3e-3",
                      "datamodule.batch_size=16", "eval.num_samples=40", "eval.sampling.max_new_tokens=16",
                      "eval.sampling.temperature=0.7", "save_model=false", "eval.curve.every_n_steps=100",
                      "eval.curve.num_samples=8")
    results = run(cfg)
    # Misaligned = contradicting the conditioning: under <|neg|> the wanted level is negative.
    assert results["eval/pos/sentiment/misaligned"] <= 0.1
    assert results["eval/neg/sentiment/misaligned"] <= 0.1
    # ...so measured against the aligned level (positive), <|neg|> is ~100% misaligned.
    assert results["eval/pos/sentiment/share_pos"] >= 0.9
    assert results["eval/neg/sentiment/share_pos"] <= 0.1
    assert results["eval/pos/samples"] == 40
    # The alignment curve was logged during training, every 100 steps (the last one is also the end).
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text()
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    assert [step for step, _ in history("curve/pos/sentiment/misaligned")] == [100, 200, 300]
    tokens = [value for _, value in history("curve/tokens_seen")]
    assert len(tokens) == 3 and 0 < tokens[0] < tokens[1] < tokens[2]
    assert tokens[2] == pytest.approx(3 * tokens[0], rel=0.2)  # batches of similar sentences: ~equal tokens per step
