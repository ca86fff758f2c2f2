"""MLflow tracking: one run per job, one parent run per sweep, and the artifacts that make a run
reproducible and comparable (resolved config, dataset statistics, metric tables, samples, model).

Lightning's MLFlowLogger logs the curves; this module adds what it does not do. The logging functions
are called on global rank 0 only. The two Hydra callbacks run in the sweep's main process.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf, read_write

from alignment import PROJECT_ROOT

log = logging.getLogger(__name__)
PARENT_FILE = "mlflow_parent_run_id"
#: The joint misalignment under the aligned control tokens: the one number by which runs are compared.
HEADLINE_METRIC = "_summary/aligned_misaligned"


class MLflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run for each `-m` sweep, so the UI groups its jobs.

    The parent's id is written into the sweep folder, where every job (in this process, or on a
    cluster node through a launcher) finds it and tags itself `mlflow.parentRunId`. The parent ends
    FINISHED when the sweep does, or FAILED as soon as a job fails (Hydra then stops the sweep
    without calling on_multirun_end, which would leave the parent RUNNING forever).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.artifact_location = artifact_location_for(tracking_uri, artifact_location)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client = open_store(self.tracking_uri)
        experiment_id = ensure_experiment(client, self.experiment_name, self.artifact_location)
        describe_experiment(client, experiment_id)
        overrides = " ".join(command_line_overrides(config.hydra.overrides.task))
        run = client.create_run(experiment_id, run_name=f"sweep {Path(config.hydra.sweep.dir).name}",
                                tags={"sweep.overrides": overrides, "sweep.dir": str(config.hydra.sweep.dir)})
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        (Path(config.hydra.sweep.dir) / PARENT_FILE).write_text(run.info.run_id)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self._terminate(config, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._terminate(config, "FINISHED")
        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if path.exists():  # the comparison report of the sweep's jobs, printed and logged to the parent run
            from alignment.report import sweep_report

            parent_id = path.read_text().strip()
            _, jobs = sweep_report(self.tracking_uri, parent_id, Path(config.hydra.sweep.dir) / "report")
            experiment_id = mlflow.MlflowClient(self.tracking_uri).get_run(parent_id).info.experiment_id
            print(f"\nSweep: MLflow parent run {parent_id}, {len(jobs)} jobs\n"
                  + ui_links(self.tracking_uri, experiment_id, parent_id, [job.info.run_id for job in jobs[::-1]]))

    def _terminate(self, config: DictConfig, status: str) -> None:
        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if path.exists():
            mlflow.MlflowClient(self.tracking_uri).set_terminated(path.read_text().strip(), status)


class DDPSweepJobCallback(Callback):
    """Hydra callback: lets a job of a `-m` sweep train with Lightning's `ddp` strategy on one machine.

    Lightning starts ranks 1.. by re-running the command line (`sys.argv`) with `hydra.run.dir` set to
    Hydra's *run* folder. In a sweep that command line is the whole sweep (`-m task=tox,none ...`), so
    each child would run every job again, in a new sweep folder, with a second MLflow parent run. While
    a sweep job runs, this callback makes the command line that of the job alone and its run folder the
    job's folder; afterwards it undoes what DDP left in the process (the process group, the rendezvous
    port, one thread per rank), so the next job starts a fresh group with its own rank-1 process.
    (Cluster launchers that start one task per device do not re-run anything; this then changes nothing.)
    """

    def __init__(self) -> None:
        self._saved: tuple[list[str], dict[str, str], int] | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        import torch

        self._saved = (list(sys.argv), dict(os.environ), torch.get_num_threads())
        sys.argv[1:] = job_command_line(sys.argv[1:], command_line_overrides(hydra_cfg.overrides.task))
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self._saved is None:
            return
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        argv, environ, threads = self._saved
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        self._saved = None


def command_line_overrides(overrides) -> list[str]:
    """Overrides as typed. Read item by item, OmegaConf would resolve `x=${hydra:runtime.output_dir}` and
    fail outside a job (HydraConfig is not set in on_multirun_start) or freeze it to this job's value."""
    return OmegaConf.to_container(overrides, resolve=False)


#: Hydra flags that choose the primary config: a re-run of one job must keep them.
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def job_command_line(args: list[str], job_overrides: list[str]) -> list[str]:
    """The arguments that run one sweep job alone: the config-choosing flags of the sweep's command line
    (`-cn x` or `--config-name=x`), then the job's own overrides; `-m` and the sweep's lists are dropped."""
    kept, i = [], 0
    while i < len(args):
        if args[i] in CONFIG_FLAGS and i + 1 < len(args):
            kept += args[i:i + 2]
            i += 2
            continue
        if args[i].startswith("-") and args[i].split("=", 1)[0] in CONFIG_FLAGS:
            kept.append(args[i])
        i += 1
    return kept + list(job_overrides)


def artifact_location_for(tracking_uri: str, local_dir: str | None) -> str | None:
    """Where a new experiment stores artifacts: `local_dir` for a local store (sqlite, file), None for a
    tracking server, which then chooses (`mlflow-artifacts:/...`, uploaded through the server to its
    --artifacts-destination). A local path given to a server would make every job write its artifacts
    on its own machine, out of the server's (and its UI's) reach."""
    return None if urlparse(tracking_uri).scheme in ("http", "https", "databricks") else local_dir


def mlflow_logger(tracking_uri: str, artifact_location: str | None = None, **kwargs: Any):
    """Lightning's MLFlowLogger (same arguments; alignment.lifecycle.RunLogger: the run's status is set once it all
    ended), with the artifact location left to the server if there is one."""
    from alignment.lifecycle import RunLogger

    open_store(tracking_uri)
    return RunLogger(tracking_uri=tracking_uri,
                        artifact_location=artifact_location_for(tracking_uri, artifact_location),
                        **kwargs)


def open_store(tracking_uri: str) -> mlflow.MlflowClient:
    """A client of the store, opened under a file lock if it is a sqlite file: the first process to open a new
    file creates MLflow's tables, and two sweeps started at once raced on that (`table _alembic_tmp_experiments
    already exists`: the second sweep lost its parent run). Later opens in the same process reuse the store."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return mlflow.MlflowClient(tracking_uri)
    database = Path(parsed.path[1:])  # sqlite:////abs/file.db -> /abs/file.db; sqlite:///rel.db -> rel.db
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = mlflow.MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)  # the store is open: its tables exist and are current
    return client


def ensure_experiment(client: mlflow.MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # another job created it in the meantime
        return client.get_experiment_by_name(name).experiment_id


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that make runs findable: task, objective, model, data, the sweep parent, the git commit."""
    tags = {"task": cfg.task.name, "objective": cfg.objective.name, "seed": str(cfg.seed),
            "model": HydraConfig.get().runtime.choices.get("model", "") if HydraConfig.initialized() else "",
            "data": str(cfg.data.source.get("_target_", "")).split(".")[-1]}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["output_dir"] = hc.runtime.output_dir
        # The command line that reproduces this run: `python -m alignment <overrides>`.
        tags["overrides"] = " ".join(command_line_overrides(hc.overrides.task))
        if hc.mode == RunMode.MULTIRUN:
            parent = Path(hc.sweep.dir) / PARENT_FILE
            if parent.exists():
                tags["mlflow.parentRunId"] = parent.read_text().strip()
            tags["sweep.job"] = str(hc.job.num)
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def reproduce_command() -> str | None:
    """The command line that runs this job again, `python -m alignment <its overrides>` (None outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    return "python -m alignment " + shlex.join(command_line_overrides(HydraConfig.get().overrides.task))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_params(cfg: DictConfig) -> dict[str, str]:
    """The parameters that define a run, under `_run/`: MLflow's compare page lists parameters sorted by key and
    plots the first three that differ, and `_` sorts before every lowercase key of the flattened config."""
    tags = run_tags(cfg)
    return {"_run/task": tags["task"], "_run/objective": tags["objective"], "_run/model": tags["model"],
            "_run/seed": tags["seed"], "_run/guidance": ",".join(f"{g:g}" for g in cfg.eval.guidance_scales)}


def log_setup(logger, cfg: DictConfig, data_meta: dict) -> None:
    """Before training: the parameters that define the run, the resolved config (params are truncated to 250
    characters by MLflow, the artifact is not), the flattened config as params, the dataset statistics, the
    installed packages (environment.txt), and the experiment's description."""
    client, run_id = logger.experiment, logger.run_id
    copies = section_copies(cfg)
    flat = {key: value for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
            if not any(key.startswith(f"{copy}/") for copy in copies)}
    logger.log_hyperparams({**run_params(cfg), **flat})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (Path(tmp) / "dataset.json").write_text(json.dumps(data_meta, indent=2, default=str))
        (Path(tmp) / "environment.txt").write_text(environment())
        client.log_artifacts(run_id, tmp)
    describe_experiment(client, logger.experiment_id)
    if cfg.get("evaluate", True):
        # NaN (not measured yet) until the evaluation logs the value. MLflow's compare page colours its
        # parallel-coordinates plot by the first metric a run logged: this one, not a dataset statistic.
        client.log_metric(run_id, HEADLINE_METRIC, float("nan"), step=0)
    for key, value in data_meta["stats"].items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, f"data/{key}", float(value))
    for name, thresholds in data_meta["thresholds"].items():
        client.log_param(run_id, f"resolved/thresholds/{name}", json.dumps(thresholds))


def section_copies(cfg: DictConfig) -> list[str]:
    """The keys whose value is a whole other section (`datamodule.task: ${task}`), as flattened keys: logged as
    parameters they would repeat that section (75 of the default config's 237 keys) in the UI's parameter table."""
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    return [key for key, value in raw.items() if isinstance(value, str) and re.fullmatch(r"\$\{[\w.]+\}", value)
            and isinstance(OmegaConf.select(cfg, key.replace("/", ".")), DictConfig)]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        return {f"{prefix}{i}": json.dumps(v) for i, v in enumerate(tree)}
    return {prefix.rstrip("/"): tree}


def log_evaluation(logger, rows: list[dict], samples: list[dict], capability: dict | None = None) -> None:
    """Metrics per combination, the whole table as CSV/JSON artifacts, and the samples as an MLflow table."""
    client, run_id = logger.experiment, logger.run_id
    values = {f"eval/capability/{key}": value for key, value in (capability or {}).items()}
    for row in rows:
        prefix = f"eval/{row['combination']}" + ("" if row["guidance"] == 1.0 else f"/g{row['guidance']:g}")
        values.update({f"{prefix}/{key}": value for key, value in row.items()
                       if isinstance(value, (int, float)) and key != "guidance" and value == value})  # skip NaN
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, 0) for key, value in values.items()]
    for start in range(0, len(metrics), 1000):  # one transaction per thousand metrics, not one each
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame(rows).to_csv(Path(tmp) / "eval_metrics.csv", index=False)
        (Path(tmp) / "eval_metrics.json").write_text(json.dumps(rows, indent=2, default=float))
        client.log_artifacts(run_id, tmp, artifact_path="eval")
    if samples:
        client.log_table(run_id, data=pd.DataFrame(samples), artifact_file="eval/samples.json")


def summary_metrics(rows: list[dict], task, trained: dict[str, float]) -> dict[str, float]:
    """The headline numbers (g = 1 rows), under `_summary/`: MLflow's compare page sorts metrics by key and `_` comes
    before every lowercase letter, so they head its metric table (as `_run/` heads the parameters):
    joint misalignment under the aligned tokens (`none` for an untagged run, as in alignment.report) and
    unconditioned; the share of each level under its own token (does each token steer?); the LM loss on untagged
    text (val/loss when nothing is tagged: then all text is untagged); distinct-2 of the unconditioned samples."""
    by_name = {row["combination"]: row for row in rows if row["guidance"] == 1.0}
    aligned = task.combination_name(task.aligned_levels) if task.tagged else "none"
    wanted = {HEADLINE_METRIC: (aligned, "joint/misaligned"),
              "_summary/unconditioned_misaligned": ("none", "joint/misaligned"),
              "_summary/distinct_2": ("none", "distinct_2")}
    for name in task.tagged:
        for level in task.attributes[name].level_names:
            wanted[f"_summary/{level}_under_{level}"] = (level, f"{name}/share_{level}")
    out = {key: float(by_name[combo][field]) for key, (combo, field) in wanted.items()
           if field in by_name.get(combo, {}) and by_name[combo][field] == by_name[combo][field]}  # no NaN
    loss = trained.get("val/loss_untagged", trained.get("val/loss") if not task.tagged else None)
    if loss is not None:
        out["_summary/val_loss_untagged"] = float(loss)
    return out


def log_summary(logger, values: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    logger.experiment.log_batch(logger.run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])


def environment() -> str:
    """Python, platform and every installed distribution with its version (`pip freeze`'s content, without
    starting pip), so a run says what it ran on."""
    import platform
    from importlib import metadata

    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata['Name']},
                      key=str.lower)
    return f"# python {platform.python_version()} on {platform.platform()}\n" + "\n".join(packages) + "\n"


EXPERIMENT_NOTE = """Language models trained with control tokens by the `alignment` project.
One run per training job; a sweep (`python -m alignment -m ...`) groups its jobs under a parent run `sweep <time>`
whose artifacts hold the comparison report.

The runs-table link printed at the end of every run opens the view "headline": the metrics `_summary/*` (joint
misalignment under the aligned tokens and unconditioned, the untagged LM loss, distinct-2) and the parameters
`_run/*` (task, objective, model, seed). More `_summary/*` columns (each level's share under its own token) are
under Columns. The tag `overrides` is the command line that reproduces a run.
"""


def describe_experiment(client: mlflow.MlflowClient, experiment_id: str) -> None:
    """The experiment's description in the UI (`mlflow.note.content`), unless someone already wrote one, and the
    runs table's headline view."""
    tags = client.get_experiment(experiment_id).tags
    if "mlflow.note.content" not in tags:
        client.set_experiment_tag(experiment_id, "mlflow.note.content", EXPERIMENT_NOTE)
    if json.loads(tags.get(VIEW_TAG, "{}")) != HEADLINE_VIEW:
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(HEADLINE_VIEW))


#: The runs table opens on MLflow's default columns (name, time, duration, source, models) and the user adds the
#: others by hand. A "shared view" is a saved table state that MLflow's UI reads from the experiment tag
#: `mlflow.sharedViewState.<key>` when the URL says `?viewStateShareKey=<key>`; the printed links open this one.
VIEW_KEY = "headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# Sorted by start time (the default), the table folds a sweep's jobs under its parent run, closed; sorted by any
# other key it lists every run. Least misaligned first; runs without the metric (sweep parents) come last. A few
# columns only: the table draws the columns that fit in the window, the others when scrolled to.
HEADLINE_VIEW = {"selectedColumns": ["attributes.`Created`"]
                 + [f"metrics.`_summary/{name}`" for name in ("aligned_misaligned", "unconditioned_misaligned",
                                                              "val_loss_untagged", "distinct_2")]
                 + [f"params.`_run/{name}`" for name in ("task", "objective", "model", "seed")],
                 "orderByKey": "metrics.`_summary/aligned_misaligned`", "orderByAsc": True}
#: The classic runs table (not the GenAI overview), in the headline view.
RUNS_TABLE_QUERY = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})


def log_datasets(logger, cfg: DictConfig, folder: Path, meta: dict) -> None:
    """The training and validation sentences as MLflow datasets (the run page's "Datasets used" and the runs
    table's Dataset column): named after the data config, the built folder as source, its cache key as digest (a
    hash of everything that built it: source, cleaning, split, scorers, thresholds, tokenizer), sizes as profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = run_tags(cfg)["data"]
    if HydraConfig.initialized():
        name = HydraConfig.get().runtime.choices.get("data", name)
    stats, source = meta["stats"], json.dumps({"uri": str(folder)})
    inputs = [DatasetInput(Dataset(f"{name}-{split}", folder.name, "local", source,
                                   profile=json.dumps({"examples": stats[f"{split}_examples"],
                                                       "tokens": stats[f"{split}_tokens"]})),
                           tags=[InputTag("mlflow.data.context", context)])
              for split, context in (("train", "training"), ("val", "validation"))]
    logger.experiment.log_inputs(logger.run_id, datasets=inputs)


def log_curve_plot(logger) -> None:
    """The run's alignment curve as a plot (artifact plots/alignment_curve.png), as the sweep report draws it."""
    from alignment.report.build import curve_plot

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alignment_curve.png"
        skipped = curve_plot(logger.experiment, logger.run_id, path)
        if skipped:
            log.warning("No alignment-curve plot: %s", skipped)
        else:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="plots")


def log_model_dir(logger, model_dir: Path) -> None:
    logger.experiment.log_artifacts(logger.run_id, str(model_dir), artifact_path="model")


def log_mlflow_model(logger, model_dir: Path) -> None:
    """The saved folder again as an MLflow Transformers model (artifact `hf_model`): `mlflow.register_model(
    "runs:/<run id>/hf_model", name)` registers it, `mlflow.pyfunc.load_model` (what `mlflow models serve` runs)
    samples from it with the saved generation defaults. Its requirements are given, not inferred (inference would
    load the model once more in a subprocess); torch without its build suffix (+cpu)."""
    from importlib import metadata

    import mlflow.transformers
    from transformers import pipeline

    requirements = [f"{name}=={metadata.version(name).split('+')[0]}"
                    for name in ("transformers", "tokenizers", "safetensors", "torch")]
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.transformers.save_model(pipeline("text-generation", model=str(model_dir)), str(Path(tmp) / "hf_model"),
                                       pip_requirements=requirements)
        logger.experiment.log_artifacts(logger.run_id, str(Path(tmp) / "hf_model"), artifact_path="hf_model")


#: The port `make ui` serves on (its PORT variable) and the address the printed links use for a local store.
UI_PORT = 5000


def ui_command(tracking_uri: str) -> str:
    if not _is_local(tracking_uri):
        return f"open {tracking_uri} in a browser"
    # `make ui` opens the store of ALIGNMENT_RUNS_DIR / MLFLOW_TRACKING_URI, as conf/paths/default.yaml does.
    runs_dir = os.environ.get("ALIGNMENT_RUNS_DIR", str(PROJECT_ROOT / "runs"))
    default = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{runs_dir}/mlflow.db")
    make = "make ui" if tracking_uri == default else f"make ui TRACKING_URI={tracking_uri}"
    return f"{make}   (or: mlflow ui --backend-store-uri {tracking_uri} --port {UI_PORT})"


def _is_local(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("sqlite", "file", "")


def ui_links(tracking_uri: str, experiment_id: str, run_id: str | None = None, compare: Sequence[str] = ()) -> str:
    """Where to look in the MLflow UI: the run's page, the experiment's runs table, the compare page of `compare`.
    A local store has no server: the links point where `make ui` serves it."""
    if _is_local(tracking_uri):
        base, lines = f"http://127.0.0.1:{UI_PORT}", [f"MLflow UI: {ui_command(tracking_uri)}, then open"]
    elif urlparse(tracking_uri).scheme in ("http", "https"):
        base, lines = tracking_uri.rstrip("/"), ["MLflow UI:"]
    else:  # e.g. databricks: its own addresses
        return f"MLflow: run {run_id} in experiment {experiment_id} of {tracking_uri}"
    experiment = f"{base}/#/experiments/{experiment_id}"
    if run_id:
        lines.append(f"  this run:   {experiment}/runs/{run_id}")
    lines.append(f"  runs table: {experiment}/runs?{RUNS_TABLE_QUERY}")
    if compare:
        query = urlencode({"runs": json.dumps(list(compare)), "experiments": json.dumps([experiment_id])})
        lines.append(f"  compare:    {base}/#/compare-runs?{query}")
    return "\n".join(lines)
