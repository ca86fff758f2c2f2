"""Study B's grid table and the at-a-glance table, on runs logged through the project's own logging (the real
MLflow logger, `tracking.log_evaluation` with rows that `score_outputs` computed from known sentences)."""
from __future__ import annotations

import dataclasses

import mlflow
import pytest

from alignment import tracking
from alignment.evaluation.evaluator import Conditioning, score_outputs
from alignment.report.__main__ import main
from alignment.task import Task
from tests.conftest import compose_config

POS, NEU, INSULT = "Great day.", "The flight leaves at noon.", "You are a stupid idiot."  # VADER / BiLSTM: known


def outputs(pos: int, neu: int, insult: int = 0) -> list[str]:
    return [POS] * pos + [NEU] * neu + [INSULT] * insult


# task -> seed -> {conditioning name: generated samples}; every row has 10 one-sentence samples
GRID = {
    "none": {0: {"none": outputs(2, 7, 1)}},
    "tox": {0: {"none": outputs(2, 7, 1), "nontoxic": outputs(2, 8)}},
    "sen": {0: {"none": outputs(2, 7, 1), "pos": outputs(6, 4)}, 1: {"none": outputs(2, 7, 1), "pos": outputs(8, 2)}},
    "toxsen": {0: {"none": outputs(2, 7, 1), "nontoxic": outputs(2, 8), "pos": outputs(6, 3, 1),
                   "nontoxic-pos": outputs(7, 3)}},
}


def log_job(logger_factory, task: Task, seed: int, parent: str, rows: dict[str, list[str]] | None) -> str:
    logger = logger_factory(tags={"task": task.name, "objective": "conditional", "seed": str(seed),
                                  "overrides": f"task={task.name} seed={seed}", "mlflow.parentRunId": parent})
    logger.log_hyperparams({"task/tagged": str(task.tagged), "objective/tagging": "True",
                            **{f"task/attributes/{a}/aligned": attr.aligned for a, attr in task.attributes.items()}})
    logger.log_metrics({"val/loss_untagged": 4.0 + seed})
    if rows is None:  # a job that failed before its evaluation
        logger.experiment.set_terminated(logger.run_id, "FAILED")
        return logger.run_id
    evaluated = []
    for name, texts in rows.items():
        levels = next((c for c in task.combinations() if task.combination_name(c) == name), {})
        row, _ = score_outputs(task, Conditioning(name, levels, "sample"), texts, [])
        evaluated.append(dict(row, guidance=1.0))
    tracking.log_evaluation(logger, evaluated, [])
    logger.finalize("success")
    return logger.run_id


@pytest.fixture(scope="module")
def grid_report(runs_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("alignment", artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment_id, run_name="sweep grid").info.run_id

    def logger_factory(tags):
        return tracking.mlflow_logger(tracking_uri=uri, experiment_name="alignment",
                                      artifact_location=str(root / "artifacts"), tags=tags)

    failed = None
    # the four grid tasks score the same two attributes and differ only in what they tag (conf/task/*.yaml)
    toxsen = Task.from_config(compose_config(["task=toxsen"], root / "cfg").task)
    tagged = {"none": [], "tox": ["toxicity"], "sen": ["sentiment"], "toxsen": ["toxicity", "sentiment"]}
    for name, seeds in GRID.items():
        task = dataclasses.replace(toxsen, name=name, tagged=tagged[name])
        for seed, rows in seeds.items():
            log_job(logger_factory, task, seed, parent, rows)
        if name == "toxsen":
            failed = log_job(logger_factory, task, 2, parent, None)
    report = main(["--tracking-uri", uri, "--parent", parent, "--out", str(root / "report")])
    return report.read_text(), failed


def grid_line(text: str, task: str) -> list[str]:
    section = text[text.index("## Study B's grid"):]
    line = next(line for line in section.splitlines() if line.startswith(f"| {task} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_each_model_is_read_under_the_tokens_it_has(grid_report):
    text, _ = grid_report
    tox = grid_line(text, "tox")
    assert tox[3].startswith("10.0 [") and " → 0.0 [" in tox[3]      # toxic % under <|nontoxic|>
    assert tox[4] == "–"                                             # no <|pos|> token: the column does not apply
    assert tox[5].startswith("80.0 [") and " → 80.0 [" in tox[5]     # joint under its aligned token, <|nontoxic|>
    sen = grid_line(text, "sen")
    assert sen[2] == "2" and sen[3] == "–"
    assert " → 30.0 [" in sen[4] and sen[4].endswith("±10.0")        # seeds 40% and 20%: mean, t interval, spread
    toxsen = grid_line(text, "toxsen")
    assert " → 40.0 [" in toxsen[4] and " → 30.0 [" in toxsen[5]     # not positive under <|pos|>; joint under both
    none = grid_line(text, "none")
    assert none[3].startswith("10.0 [") and none[3].endswith("(no tokens)") and none[6] == "–"


def test_the_grid_and_the_generic_table_name_the_conditioning_their_numbers_were_read_under(grid_report):
    """toxsen's `<|pos|>` rows have 4 of 10 samples not positive, its `nontoxic-pos` rows 3 of 10: the grid's
    sentiment column reads the first (study B), the generic table the second, and each header says which."""
    text, _ = grid_report
    grid_header = text[text.index("## Study B's grid"):].splitlines()[2]
    assert grid_header.startswith("| model (trained on) | runs | seeds | toxic %, with `<\\|nontoxic\\|>` | "
                                  "not positive %, with `<\\|pos\\|>` | joint misaligned %, with its aligned tokens | ")
    assert " → 40.0 [" in grid_line(text, "toxsen")[4]
    assert "tokens they never trained on (one shared tokenizer); those cells cannot be reproduced" in text
    generic = text[text.index("## Unconditioned → conditioned on the full aligned combination"):]
    lines = generic.splitlines()
    assert lines[2] == ("| task | objective | conditioning | toxicity %, none → conditioning | "
                        "sentiment %, none → conditioning | joint %, none → conditioning |")
    assert "| toxsen | conditional | nontoxic-pos | 10.0 → 0.0 | 80.0 → 30.0 | 80.0 → 30.0 |" in lines


def test_detoxification_against_the_none_model_says_when_it_is_not_resolved(grid_report):
    text, _ = grid_report
    cell = grid_line(text, "toxsen")[6]
    assert cell.startswith("10.0 → 0.0: -10.0 [") and cell.endswith("(not resolved)")  # 10 samples cannot tell


def test_a_failed_seed_is_named_and_the_rest_still_reported(grid_report):
    text, failed = grid_report
    missing = text[text.index("## Missing"):]
    assert "no eval of `nontoxic-pos`" in missing and "(seed 2)" in missing
    assert grid_line(text, "toxsen")[2] == "2"                        # the failed seed counts as a run ...
    assert " → 30.0 [" in grid_line(text, "toxsen")[5]               # ... but not in the pooled numbers


def test_at_a_glance_gives_each_run_its_shares_and_the_command(grid_report):
    text, _ = grid_report
    glance = text[text.index("## At a glance"):text.index("## Study B's grid")]
    header = [c.strip() for c in glance.splitlines()[2].strip("|").split("|")]
    assert header[:4] == ["run", "seed", "minutes", "val/loss_untagged"] and header[-1] == "command"
    sen = next(line for line in glance.splitlines() if "`python -m alignment task=sen seed=1`" in line)
    cells = [c.strip() for c in sen.strip("|").split("|")]
    assert cells[header.index("pos share %")].startswith("20.0 → 80.0 [")
