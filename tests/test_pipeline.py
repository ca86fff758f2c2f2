"""End to end: a tiny real experiment leaves an MLflow run with curves, evaluation, artifacts and a
model that plain transformers can load."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from alignment.data.build import Split
from alignment.train import run
from tests.conftest import TINY, compose_config


def _mlflow_run(cfg):
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return client, runs[0]


def test_default_experiment_end_to_end(tiny_config, tmp_path, capsys):
    cfg = tiny_config("eval.curve.every_n_steps=3", "eval.curve.num_samples=4", "log_mlflow_model=true")
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
    summary = {key: value for key, value in metrics.items() if key.startswith("_summary/")}
    assert summary == {"_summary/aligned_misaligned": metrics["eval/nontoxic-pos/joint/misaligned"],
                       "_summary/unconditioned_misaligned": metrics["eval/none/joint/misaligned"],
                       "_summary/distinct_2": metrics["eval/none/distinct_2"],
                       "_summary/nontoxic_under_nontoxic": metrics["eval/nontoxic/toxicity/share_nontoxic"],
                       "_summary/toxic_under_toxic": metrics["eval/toxic/toxicity/share_toxic"],
                       **{f"_summary/{s}_under_{s}": metrics[f"eval/{s}/sentiment/share_{s}"]
                          for s in ("neg", "neu", "pos")},
                       "_summary/val_loss_untagged": metrics["val/loss_untagged"]}
    # They head the compare page's sorted metric table; the first metric a run logged colours its plot: logged as
    # NaN before training, the value replaced it.
    assert sorted(metrics)[0].startswith("_summary/") and list(metrics)[0] == "_summary/aligned_misaligned"
    history = client.get_metric_history(mlrun.info.run_id, "_summary/aligned_misaligned")
    assert math.isnan(history[0].value) and history[-1].value == metrics["eval/nontoxic-pos/joint/misaligned"]
    assert "environment.txt" in artifacts
    # The parameters that define the run sort first in the compare page's parameter list (`_` < `a`).
    params = mlrun.data.params
    assert {k: v for k, v in params.items() if k.startswith("_run/")} == {
        "_run/task": "toxsen", "_run/objective": "conditional", "_run/model": "tiny", "_run/seed": str(cfg.seed),
        "_run/guidance": "1,2"}
    assert sorted(params)[:5] == ["_run/guidance", "_run/model", "_run/objective", "_run/seed", "_run/task"]
    # Sections that only repeat another (datamodule.task: ${task}) are logged once, under their own name.
    assert params["task/name"] == "toxsen" and not any(k.startswith(("datamodule/task/", "module/objective/"))
                                                       for k in params)
    experiment = client.get_experiment(mlrun.info.experiment_id)
    assert "_summary/*" in experiment.tags["mlflow.note.content"]
    # The runs table's saved view "headline" shows them, runs listed flat, least misaligned first.
    assert json.loads(experiment.tags["mlflow.sharedViewState.headline"]) == {
        "selectedColumns": ["attributes.`Created`", "metrics.`_summary/aligned_misaligned`",
                            "metrics.`_summary/unconditioned_misaligned`", "metrics.`_summary/val_loss_untagged`",
                            "metrics.`_summary/distinct_2`", "params.`_run/task`", "params.`_run/objective`",
                            "params.`_run/model`", "params.`_run/seed`"],
        "orderByKey": "metrics.`_summary/aligned_misaligned`", "orderByAsc": True}
    printed = capsys.readouterr().out
    page = f"http://127.0.0.1:5000/#/experiments/{mlrun.info.experiment_id}/runs"
    assert f"this run:   {page}/{mlrun.info.run_id}\n" in printed
    assert f"runs table: {page}?workflowType=machine_learning&viewStateShareKey=headline\n" in printed
    # The training and validation sentences as MLflow datasets, with the built folder's key as digest.
    built = json.loads((tmp_path / "out" / "dataset.json").read_text())["stats"]
    inputs = {i.dataset.name: i for i in mlrun.inputs.dataset_inputs}
    assert sorted(inputs) == ["tweets-train", "tweets-val"]
    for split, context in (("train", "training"), ("val", "validation")):
        dataset = inputs[f"tweets-{split}"]
        folder = json.loads(dataset.dataset.source)["uri"]
        assert dataset.dataset.digest == folder.rsplit("/", 1)[1] and (Path(folder) / "meta.json").exists()
        assert json.loads(dataset.dataset.profile) == {"examples": built[f"{split}_examples"],
                                                       "tokens": built[f"{split}_tokens"]}
        assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", context)]
    # Its own alignment curve, drawn as the sweep report draws them.
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id, "plots")] == ["plots/alignment_curve.png"]
    # Where the run's time went (alignment.timing): every phase of this run, adding up to the total, and printed.
    phases = {key: value for key, value in metrics.items() if key.startswith("time/")}
    assert set(phases) == {f"time/{name}" for name in ("data", "setup", "training", "validation", "curve", "saving",
                                                        "evaluation", "total")}
    assert all(value >= 0 for value in phases.values())
    assert sum(value for key, value in phases.items() if key != "time/total") == pytest.approx(phases["time/total"])
    assert "Time per phase: data " in printed and "curve " in printed

    # The saved model loads with no project code, control tokens included.
    model_dir = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("<|nontoxic|><|pos|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and max(ids) < model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        assert model(torch.tensor([[tokenizer.eos_token_id] + ids])).logits.shape[-1] == len(tokenizer)
    assert (tmp_path / "out" / "eval_table.txt").read_text().count("\n") >= 5

    # The alignment curve (AlignmentCurve) at steps 3 and 6, for `none` and the aligned combination only.
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)]
    for row in ("none", "nontoxic-pos"):
        for key in ("joint/misaligned", "toxicity/misaligned", "sentiment/misaligned"):
            points = history(f"curve/{row}/{key}")
            assert [step for step, _ in points] == [3, 6], key
            assert all(0.0 <= value <= 1.0 for _, value in points)
            lows, highs = history(f"curve/{row}/{key}_low"), history(f"curve/{row}/{key}_high")
            assert all(lo[1] <= value <= hi[1] for lo, (_, value), hi in zip(lows, points, highs))
    assert {key for key in metrics if key.startswith("curve/")} == {"curve/tokens_seen"} | {
        f"curve/{row}/{key}{suffix}" for row in ("none", "nontoxic-pos") for suffix in ("", "_low", "_high")
        for key in ("joint/misaligned", "toxicity/misaligned", "sentiment/misaligned")}
    # tokens seen: the real (unpadded) tokens of the first 3 and 6 training batches, rising
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup()
    batches = list(itertools.islice(datamodule.train_dataloader(), 6))
    tokens = [sum(int(b["attention_mask"].sum()) for b in batches[:n]) for n in (3, 6)]
    assert history("curve/tokens_seen") == [(3, tokens[0]), (6, tokens[1])] and 0 < tokens[0] < tokens[1]

    # val/loss is on the tagged validation text, val/loss_untagged on the same sentences with no control token.
    control = tokenizer.convert_tokens_to_ids(datamodule.meta["control_tokens"])
    tagged, untagged = (Split.load(datamodule.folder, name) for name in ("val", "val_untagged"))
    assert np.isin(tagged.tokens, control).sum() > len(tagged)  # nearly every sentence has both tokens (1% none)
    assert len(untagged) == len(tagged) and not np.isin(untagged.tokens, control).any()
    assert untagged.tokens.tolist() == tagged.tokens[~np.isin(tagged.tokens, control)].tolist()
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["val/loss_untagged"])
    assert metrics["val/loss"] != metrics["val/loss_untagged"]

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
    assert math.isfinite(results["val/loss"]) and 0.0 <= results["eval/none/joint/misaligned"] <= 1.0
    # the core rows of one tagged attribute: none, untagged (EOS alone), each of its levels; the untagged task: none
    levels = {"tox": {"nontoxic", "toxic"}, "sen": {"neg", "neu", "pos"}, "none": set()}[task]
    assert {key.split("/")[1] for key in results if key.startswith("eval/")} == \
        ({"none", "untagged"} | levels if levels else {"none"})


@pytest.mark.parametrize("objective", ["mle", "filtering", "unlikelihood", "awr", "rwr"])
def test_every_objective_runs_with_a_study_a_task(tiny_config, objective):
    cfg = tiny_config(f"objective={objective}", "task=toxicity", "save_model=false", "eval.num_samples=2")
    results = run(cfg)
    assert math.isfinite(results["train/loss"]) and math.isfinite(results["val/loss"])
    # untagged objectives validate one text once: its loss is both the tagged and the untagged loss
    assert results["val/loss_untagged"] == results["val/loss"]
    assert "eval/none/joint/misaligned" in results


def test_quantile_threshold_reaches_the_objective(tiny_config):
    """The task's {quantile: q} is resolved once, by the build, on the training sentences' combined misalignment
    (float32, as the per-token scores are stored), and the objective takes the resolved task's number."""
    cfg = tiny_config("objective=unlikelihood", "task=toxicity", "task.threshold={quantile:0.5}",
                      "data.max_tokens=null")
    dm = instantiate(cfg.datamodule)
    dm.prepare_data()
    assert dm.meta["stats"]["sentences_too_long"] == 0  # so every training sentence is one training example
    train = Split.load(dm.folder, "train")
    sentence_scores = train.scores[train.offsets[:-1]]  # each example's first token (EOS) carries its score
    assert dm.task.threshold == pytest.approx(float(np.quantile(sentence_scores, 0.5)))
    objective = instantiate(cfg.module.objective)
    objective.configure(8, dm.task)
    assert objective.threshold == dm.task.threshold


@pytest.mark.parametrize("task,data", [("pep8", "data=python_code"), ("pii", "data=tweets")])
def test_study_a_code_and_pii_tasks_run(tiny_config, task, data):
    cfg = tiny_config(f"task={task}", data, "data.source.limit=60", "save_model=false", "eval.num_samples=2")
    results = run(cfg)
    assert f"eval/aligned/{task}/misaligned" in results and f"eval/misaligned/{task}/misaligned" in results


class LogitsDtype(pl.Callback):
    """Records the dtype of the LM's logits in every training forward pass (bf16 under bf16-mixed autocast)."""

    seen: set = set()

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.register_forward_hook(lambda module, args, out: LogitsDtype.seen.add(out.logits.dtype)
                                              if module.training else None)


@pytest.mark.slow
def test_the_shipped_trainer_defaults_run(runs_dir, tmp_path):
    """The shipped precision (conf/trainer/cpu.yaml), ModelCheckpoint on val/loss and LearningRateMonitor, as
    `python -m alignment` ships them."""
    shipped = [o for o in TINY if not o.startswith(("trainer.precision=", "callbacks="))]
    cfg = compose_config(shipped + ["task=tox", "save_model=false", "eval.num_samples=2", "trainer.max_steps=8",
                                    "trainer.val_check_interval=4", "+callbacks.probe._target_=" + __name__
                                    + ".LogitsDtype"], tmp_path / "out")
    assert list(cfg.callbacks) == ["alignment_curve", "checkpoint", "lr_monitor", "probe"]
    LogitsDtype.seen = set()
    run(cfg)
    assert LogitsDtype.seen == {{"bf16-mixed": torch.bfloat16, "32-true": torch.float32}[cfg.trainer.precision]}

    client, mlrun = _mlflow_run(cfg)
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)]
    # The learning rate of both parameter groups, step by step: warmup capped at 1 step (8 // 10 -> 1: step 0 at 0,
    # transformers' warmup starts from 0), then cosine from 1e-3 down to its floor of 10% (1e-4) over the 7 others.
    expected = [0.0] + [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 7))) for s in range(1, 8)]
    for group in ("pg1", "pg2"):
        points = history(f"lr-AdamW/{group}")
        assert [step for step, _ in points] == list(range(8))
        assert [lr for _, lr in points] == pytest.approx(expected)
    # The checkpoint keeps the step with the lower val/loss, and the last one.
    losses = history("val/loss")
    assert [step for step, _ in losses] == [3, 7]  # after 4 and 8 optimizer steps (Lightning counts from 0 here)
    best_step, best_loss = min(losses, key=lambda point: point[1])
    folder = tmp_path / "out" / "checkpoints"
    (best,) = [p for p in folder.glob("step*.ckpt")]
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert float(state["best_model_score"]) == pytest.approx(best_loss)
    assert best.name == f"step{best_step + 1}.ckpt" == f"step{checkpoint['global_step']}.ckpt"
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8
