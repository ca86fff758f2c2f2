"""End to end: a tiny real experiment leaves an MLflow run with curves, evaluation, artifacts and a
model that plain transformers can load."""
from __future__ import annotations

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from alignment.train import run


def _mlflow_run(cfg):
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return client, runs[0]


def test_default_experiment_end_to_end(tiny_config, tmp_path, capsys):
    cfg = tiny_config("log_mlflow_model=true")
    assert (cfg.task.name, cfg.objective.name) == ("toxsen", "conditional")
    results = run(cfg)

    client, mlrun = _mlflow_run(cfg)
    assert mlrun.info.run_name == "toxsen-conditional"
    assert mlrun.info.status == "FINISHED"
    metrics = mlrun.data.metrics
    for key in ("train/loss", "val/loss", "val/loss_untagged", "data/train_examples",
                "eval/none/joint/misaligned", "eval/nontoxic-pos/joint/misaligned", "eval/toxic/toxicity/share_toxic",
                "eval/untagged/joint/misaligned", "eval/nontoxic-pos/g2/joint/misaligned"):  # the shipped g = 1, 2
        assert key in metrics, key
    assert 0.0 <= metrics["eval/nontoxic-pos/joint/misaligned"] <= 1.0
    assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) >= 5
    assert mlrun.data.params["task/name"] == "toxsen"
    assert mlrun.data.tags["task"] == "toxsen"
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "dataset.json", "eval", "model"} <= artifacts
    eval_files = {a.path for a in client.list_artifacts(mlrun.info.run_id, "eval")}
    assert {"eval/eval_metrics.csv", "eval/samples.json"} <= eval_files
    assert results["eval/nontoxic-pos/joint/misaligned"] == metrics["eval/nontoxic-pos/joint/misaligned"]

    # What the MLflow UI shows first: the headline metrics, the experiment's description, and where to look.
    summary = {key: value for key, value in metrics.items() if key.startswith("summary/")}
    assert summary == {"summary/aligned_misaligned": metrics["eval/nontoxic-pos/joint/misaligned"],
                       "summary/unconditioned_misaligned": metrics["eval/none/joint/misaligned"],
                       "summary/distinct_2": metrics["eval/none/distinct_2"],
                       "summary/nontoxic_under_nontoxic": metrics["eval/nontoxic/toxicity/share_nontoxic"],
                       "summary/toxic_under_toxic": metrics["eval/toxic/toxicity/share_toxic"],
                       **{f"summary/{s}_under_{s}": metrics[f"eval/{s}/sentiment/share_{s}"]
                          for s in ("neg", "neu", "pos")},
                       "summary/val_loss_untagged": metrics["val/loss_untagged"]}
    assert "environment.txt" in artifacts
    experiment = client.get_experiment(mlrun.info.experiment_id)
    assert "summary/*" in experiment.tags["mlflow.note.content"]
    printed = capsys.readouterr().out
    page = f"http://127.0.0.1:5000/#/experiments/{mlrun.info.experiment_id}/runs"
    assert f"this run:   {page}/{mlrun.info.run_id}\n" in printed and f"runs table: {page}\n" in printed

    # The saved model loads with no project code, control tokens included.
    model_dir = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("<|nontoxic|><|pos|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and max(ids) < model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        assert model(torch.tensor([[tokenizer.eos_token_id] + ids])).logits.shape[-1] == len(tokenizer)
    assert (tmp_path / "out" / "eval_table.txt").read_text().count("\n") >= 5

    # It samples as the evaluation does (conf/eval/unconditional.yaml, shrunk by TINY) and never the control tokens,
    # through plain transformers' pipeline, under every combination of control tokens.
    control = tokenizer.convert_tokens_to_ids(["<|nontoxic|>", "<|toxic|>", "<|neg|>", "<|neu|>", "<|pos|>"])
    config = model.generation_config
    assert (config.temperature, config.top_p, config.top_k, config.max_new_tokens, config.min_new_tokens) == (
        0.7, 0.9, 0, 8, 2)
    assert config.do_sample and sorted(config.suppress_tokens) == sorted(control)
    generate = pipeline("text-generation", model=str(model_dir))
    eos = tokenizer.eos_token
    toxicity, sentiment = ["<|nontoxic|>", "<|toxic|>"], ["<|neg|>", "<|neu|>", "<|pos|>"]
    prompts = [eos] + [eos + t for t in toxicity + sentiment] + [eos + t + s for t in toxicity for s in sentiment]
    for prompt in prompts:
        for output in generate([prompt] * 2, return_tensors=True):
            generated = output[0]["generated_token_ids"][len(tokenizer(prompt)["input_ids"]):]
            assert 1 <= len(generated) <= 8 and not set(generated) & set(control), prompt

    # The model card: how it was trained, how to prompt it, the evaluation table (also in MLflow's copy).
    card = (model_dir / "README.md").read_text()
    for expected in ("pipeline_tag: text-generation", "# toxsen-conditional", "objective: `conditional`",
                     "6 optimizer steps of 8 examples, seed 42",
                     "| toxicity | `<|nontoxic|>` `<|toxic|>` | `<|nontoxic|>` |",
                     "'<|endoftext|><|nontoxic|><|pos|>'", "- max_new_tokens: 8",
                     (tmp_path / "out" / "eval_table.txt").read_text().strip()):
        assert expected in card, expected
    logged = mlflow.artifacts.download_artifacts(run_id=mlrun.info.run_id, artifact_path="model/README.md",
                                                 tracking_uri=cfg.logger.tracking_uri, dst_path=str(tmp_path / "dl"))
    assert open(logged).read() == card

    # The same model as an MLflow Transformers model: registrable, and it samples through pyfunc with the saved
    # generation defaults (no control token after the prompt).
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    try:
        source = f"runs:/{mlrun.info.run_id}/hf_model"
        assert mlflow.register_model(source, "toxsen-conditional").status == "READY"
        prompt = eos + "<|nontoxic|><|pos|>"
        (text,) = mlflow.pyfunc.load_model(source).predict([prompt])
        assert text.startswith(prompt) and "<|" not in text.removeprefix(prompt)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("task", ["tox", "sen", "none"])
def test_grid_tasks_run(tiny_config, task):
    cfg = tiny_config(f"task={task}", "save_model=false", "eval.num_samples=2")
    results = run(cfg)
    assert "val/loss" in results
    assert ("eval/none/joint/misaligned" in results)


@pytest.mark.parametrize("objective", ["mle", "filtering", "unlikelihood", "awr", "rwr"])
def test_every_objective_runs_with_a_study_a_task(tiny_config, objective):
    cfg = tiny_config(f"objective={objective}", "task=toxicity", "save_model=false", "eval.num_samples=2")
    results = run(cfg)
    assert results["train/loss"] == results["train/loss"]  # finite, logged
    # untagged objectives validate one text once: its loss is both the tagged and the untagged loss
    assert results["val/loss_untagged"] == results["val/loss"]
    assert "eval/none/joint/misaligned" in results


def test_quantile_threshold_reaches_the_objective(tiny_config):
    from hydra.utils import instantiate

    from alignment.train import build_objective

    cfg = tiny_config("objective=unlikelihood", "task=toxicity", "task.threshold={quantile:0.5}")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    objective = build_objective(cfg.objective.loss, dm)
    import numpy as np
    scores = np.load(dm.folder / "train_sentence_misalignment.npy")
    assert objective.threshold == pytest.approx(float(np.quantile(scores, 0.5)))


@pytest.mark.parametrize("task,data", [("pep8", "data=python_code"), ("pii", "data=tweets")])
def test_study_a_code_and_pii_tasks_run(tiny_config, task, data):
    cfg = tiny_config(f"task={task}", data, "data.source.limit=60", "save_model=false", "eval.num_samples=2")
    results = run(cfg)
    assert f"eval/aligned/{task}/misaligned" in results and f"eval/misaligned/{task}/misaligned" in results
