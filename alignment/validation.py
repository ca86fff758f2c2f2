"""Every option checked before any work starts: types, ranges, choices, paths that must exist, the tracking server.

`validate(cfg)` runs first in `alignment.train.run` (and in `alignment.evaluate.evaluate_run`, on the evaluate
command's options, before any model is read), before anything is built, cached or logged, and raises one
`ConfigError` listing every problem found (option, bad value, what is allowed), so a typo costs a second instead of
a training run and leaves no empty MLflow run or partial cache entry behind. The rules are a table of plain
predicates rather than a structured-config schema: the configs hold `_target_`s, interpolations and optional groups
that a dataclass schema would have to mirror field by field, while the checks a user needs fit in one screen.
The checks that already live next to the code they protect (`Task`, `Attribute`, the objectives' arguments) are
run here on the config alone, without building scorers or data.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

#: Seconds to wait for a tracking server before saying it is unreachable (MLflow itself retries for minutes).
SERVER_TIMEOUT = 5.0
#: Lightning's precision names (lightning_fabric's _PRECISION_INPUT_STR).
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine",
              "transformer-engine-float16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
#: transformers.get_scheduler's schedules that need nothing but the warmup and the run's length (SchedulerType
#: without reduce_lr_on_plateau and greedy); tests/test_schedule.py keeps it equal to transformers' list.
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
WITH_MIN_LR_RATE = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


class ConfigError(ValueError):
    """A user error in the configuration: the message lists each bad option, its value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid configuration, nothing was run:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is no number here


def integer(low: int | None = None, nullable: bool = False) -> Rule:
    text = "an integer" + (f" >= {low}" if low is not None else "") + (" or null" if nullable else "")
    return Rule(lambda v: (nullable and v is None) or (_is_int(v) and (low is None or v >= low)), text)


def number(low: float | None = None, high: float | None = None, open_low: bool = False, open_high: bool = False,
           nullable: bool = False) -> Rule:
    left = "(" if open_low else "["
    right = ")" if open_high else "]"
    text = (f"a number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
            + (" or null" if nullable else ""))

    def test(v):
        if v is None:
            return nullable
        return (_is_number(v) and (low is None or (v > low if open_low else v >= low))
                and (high is None or (v < high if open_high else v <= high)))

    return Rule(test, text)


def choice(*options, nullable: bool = False) -> Rule:
    return Rule(lambda v: (nullable and v is None) or v in options,
                "one of " + ", ".join(map(str, options)) + (" or null" if nullable else ""))


def _is_device(name: str) -> bool:
    import torch

    try:
        return name == "auto" or isinstance(torch.device(name), torch.device)
    except (RuntimeError, ValueError):
        return False


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
FRACTION = number(0, 1)
STEPS_OR_SHARE = Rule(lambda v: (_is_int(v) and v >= 0) or (_is_number(v) and 0 <= v <= 1),
                      "an integer >= 0 (batches) or a number in [0, 1] (share)")
NUMBERS = Rule(lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_is_number(x) for x in v),
               "a non-empty list of numbers, e.g. [1.0, 2.0]")
COMBINATIONS = Rule(lambda v: v in ("all", "core", "aligned") or (isinstance(v, (list, ListConfig))
                                                                  and all(isinstance(x, str) for x in v)),
                    "all, core, aligned or a list of conditioning names")

#: option -> rule; an option the composed config does not have (another data source, objective...) is skipped.
RULES: dict[str, Rule] = {
    "seed": integer(0),
    "train": BOOLEAN, "evaluate": BOOLEAN, "save_model": BOOLEAN, "log_mlflow_model": BOOLEAN,
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.precision": choice(*PRECISIONS),
    "trainer.max_steps": integer(-1),
    "trainer.max_epochs": integer(-1, nullable=True),
    "trainer.val_check_interval": Rule(lambda v: v is None or (_is_int(v) and v >= 1) or (_is_number(v) and 0 < v <= 1),
                                       "an integer >= 1 (steps), a number in (0, 1] (share of an epoch) or null"),
    "trainer.limit_val_batches": STEPS_OR_SHARE,
    "trainer.limit_train_batches": STEPS_OR_SHARE,
    "trainer.log_every_n_steps": integer(1),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.gradient_clip_val": number(0, nullable=True),
    "datamodule.batch_size": integer(1),
    "datamodule.num_workers": integer(0),
    "module.optimizer.lr": number(0, open_low=True),
    "module.optimizer.weight_decay": number(0),
    "module.scheduler.warmup_steps": integer(0),
    "module.scheduler.name": choice(*SCHEDULES),
    "module.scheduler.min_lr_rate": number(0, 1, nullable=True),
    "data.val_fraction": number(0, 1, open_low=True, open_high=True),
    "data.max_tokens": integer(1, nullable=True),
    "data.block_size": integer(2),
    "data.layout": choice("sentence", "document", "packed"),
    "data.seed": integer(0),
    "data.source.limit": integer(0, nullable=True),
    "data.source.fraction": number(0, 1, open_low=True),
    "data.sentences.rule": choice("gentle", "strict"),
    "data.sentences.kind": choice("text", "code"),
    "data.sentences.min_words": integer(0),
    "data.sentences.max_words": integer(1, nullable=True),
    "model.noise_std": number(0),
    "task.untagged_fraction": FRACTION,
    "eval.mode": choice("unconditional", "prompted"),
    "eval.num_samples": integer(1),
    "eval.prompt_words": integer(0, nullable=True),
    "eval.prompt_max_words": integer(1, nullable=True),
    "eval.control_placement": choice("before", "after"),
    "eval.combinations": COMBINATIONS,
    "eval.missing": choice("sample", "untagged"),
    "eval.sampling.temperature": number(0),
    "eval.sampling.top_p": number(0, 1, open_low=True),
    "eval.sampling.top_k": integer(0),
    "eval.sampling.max_new_tokens": integer(1),
    "eval.sampling.min_new_tokens": integer(0),
    "eval.sampling.no_repeat_ngram_size": integer(0),
    "eval.sampling.no_repeat_ngram_prompt": BOOLEAN,
    "eval.guidance_scales": NUMBERS,
    "eval.batch_size": integer(1),
    "eval.curve.every_n_steps": integer(0),
    "eval.curve.num_samples": integer(1),
    "eval.curve.combinations": COMBINATIONS,
    "eval.seed": integer(0),
    "eval.reference.num_samples": integer(1),
    # python -m alignment.evaluate (conf/evaluate.yaml); `run` itself is checked by alignment.evaluate.run_problems
    "run": Rule(lambda v: isinstance(v, str) and v != "", "a run folder or an MLflow run id"),
    "child_run": BOOLEAN,
    "device": Rule(lambda v: isinstance(v, str) and _is_device(v), "auto or a torch device: cpu, cuda, cuda:1, mps"),
}
_ABSENT = object()


def validate(cfg: DictConfig, check_server: bool = True) -> None:
    """Raise ConfigError naming every bad option of `cfg` (a composed experiment config); return if all is well."""
    problems = []
    values = {}
    for key, rule in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except MissingMandatoryValue:
            problems.append(f"{key} is required (it is ???): {rule.allowed}")
            continue
        except InterpolationResolutionError as error:
            problems.append(f"{key}: {error}")
            continue
        if value is _ABSENT:
            continue
        values[key] = value
        if not rule.test(value):
            problems.append(f"{key}={_show(value)}: must be {rule.allowed}")
    problems += _cross_checks(values)
    problems += _paths(cfg)
    if not problems and "task" in cfg:  # the component checks assume the basic types are right
        problems += _components(cfg)
    if not problems and "run" in cfg:  # python -m alignment.evaluate: the run to evaluate
        from alignment.evaluate import run_problems

        problems += run_problems(str(cfg.run), str(cfg.logger.tracking_uri))
    server = _tracking_server(OmegaConf.select(cfg, "logger.tracking_uri", default=None)) if check_server else []
    problems += server or _resume(cfg)  # a run id is looked up on the server: only once it answers
    if problems:
        raise ConfigError(problems)


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _cross_checks(values: dict) -> list[str]:
    """Rules between two options (each alone already passed or failed above)."""
    problems = []
    low, high = values.get("eval.sampling.min_new_tokens"), values.get("eval.sampling.max_new_tokens")
    if _is_int(low) and _is_int(high) and low > high:
        problems.append(f"eval.sampling.min_new_tokens={low}: must be <= eval.sampling.max_new_tokens={high}")
    low, high = values.get("data.sentences.min_words"), values.get("data.sentences.max_words")
    if _is_int(low) and _is_int(high) and low > high:
        problems.append(f"data.sentences.max_words={high}: must be >= data.sentences.min_words={low}")
    if values.get("trainer.max_steps") == -1 and values.get("trainer.max_epochs") in (-1, None):
        problems.append("trainer.max_steps=-1 with trainer.max_epochs=-1/null: the run would never end; "
                        "set one of them")
    name, floor = values.get("module.scheduler.name"), values.get("module.scheduler.min_lr_rate")
    if floor is not None and name in SCHEDULES and name not in WITH_MIN_LR_RATE:
        problems.append(f"module.scheduler.min_lr_rate={floor}: a floor only {' and '.join(WITH_MIN_LR_RATE)} take; "
                        f"with module.scheduler.name={name} set module.scheduler.min_lr_rate=null")
    return problems


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything absolute, relative (./, ../, ~) or deeper is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _paths(cfg: DictConfig) -> list[str]:
    """Folders and files that must exist: a pretrained model or reference given as a path, the files of a
    `data=files` corpus, the Python tree of `data=python_code`, the checkpoints a scorer is pointed at."""
    problems = []
    for key in ("model.pretrained", "eval.reference.path", "data.source.root"):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and (key == "data.source.root" or _looks_like_path(value)):
            if not Path(value).expanduser().is_dir():
                problems.append(f"{key}={value}: the folder does not exist (working directory {os.getcwd()})")
    paths = OmegaConf.select(cfg, "data.source.paths", default=None, throw_on_missing=False)
    if isinstance(paths, (str, ListConfig)):
        for pattern in [paths] if isinstance(paths, str) else list(paths):
            if not glob.glob(os.path.expanduser(str(pattern)), recursive=True):
                problems.append(f"data.source.paths: no file matches {pattern!r} (working directory {os.getcwd()})")
    for name, attribute in (OmegaConf.select(cfg, "task.attributes", default=None) or {}).items():
        for role in ("scorer", "judge"):
            for field in ("checkpoint", "huggingface_config_path"):
                value = OmegaConf.select(attribute, f"{role}.{field}", default=None)
                if isinstance(value, str) and not Path(value).expanduser().exists():
                    problems.append(f"task.attributes.{name}.{role}.{field}={value}: no such file or folder")
    return problems


def _components(cfg: DictConfig) -> list[str]:
    """The checks `Task`/`Attribute` and the objectives make when built, run on the config alone (no scorer is
    loaded: the task gets none)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from alignment.task import Attribute, Task

    problems = []
    try:
        attributes = {name: Attribute(name=name, scorer=None, thresholds=list(OmegaConf.to_container(a.thresholds)),
                                      tokens=list(a.tokens), aligned=a.aligned,
                                      untagged_fraction=float(a.get("untagged_fraction", 0.0)))
                      for name, a in cfg.task.attributes.items()}
        Task(name=cfg.task.name, attributes=attributes, tagged=list(cfg.task.tagged), placement=cfg.task.placement,
             untagged_fraction=float(cfg.task.untagged_fraction), combine=cfg.task.combine,
             eval_unit=cfg.task.get("eval_unit", "sentence"))
    except (ValueError, TypeError) as error:
        problems.append(f"task: {error}")
    for key in ("task.threshold", "objective.filter_threshold"):
        spec = OmegaConf.select(cfg, key, default=None)
        if spec is not None and not _threshold_ok(spec):
            problems.append(f"{key}={_show(spec)}: must be a number or {{quantile: q}} with q in [0, 1]")
    loss = cfg.objective.loss
    try:  # a quantile threshold is resolved on the corpus later: any number stands in for it here
        instantiate(loss, **({"threshold": 0.5} if "threshold" in loss else {}))
    except (ValueError, TypeError, InstantiationException) as error:
        problems.append(f"objective.loss: {error.__cause__ or error}")
    return problems


def _threshold_ok(spec) -> bool:
    if isinstance(spec, DictConfig):
        return set(spec.keys()) == {"quantile"} and _is_number(spec.quantile) and 0 <= spec.quantile <= 1
    return _is_number(spec)


def _resume(cfg: DictConfig) -> list[str]:
    """`resume=`: a run folder or MLflow run id with a checkpoint to go on from, in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from alignment import resume

    value = OmegaConf.select(cfg, "resume", default=None)
    if value in (None, ""):
        return []
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return [f"resume={value}: resumes one run, not a sweep (-m): run the stopped job's command alone with it "
                "(a job SLURM requeued resumes by itself)"]
    return resume.problems(value, OmegaConf.select(cfg, "logger.tracking_uri", default=""))


def store_exists(tracking_uri: str) -> bool:
    """False for a local store that does not exist yet (a sqlite file, a file:// folder): asking MLflow about a run
    there would create an empty store. A server must answer (ValueError naming it otherwise): MLflow's client
    would retry for minutes."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(tracking_uri[len("sqlite:///"):]).is_file()
    if parsed.scheme in ("", "file"):
        return Path(parsed.path).is_dir()
    if problems := _tracking_server(tracking_uri):
        raise ValueError(problems[0])
    return True


def _tracking_server(uri: str | None) -> list[str]:
    """A tracking server must answer within SERVER_TIMEOUT seconds (a TCP connection to it: MLflow's client would
    retry for minutes without a word before failing)."""
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return []
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=SERVER_TIMEOUT):
            return []
    except OSError as error:
        return [f"logger.tracking_uri={uri}: the MLflow tracking server does not answer within {SERVER_TIMEOUT:g} s "
                f"({error}); start it, or unset MLFLOW_TRACKING_URI to use the local store"]


@contextmanager
def user_errors(cfg: DictConfig | None = None):
    """Around a command's work: a ConfigError ends the process with its message alone and exit code 2 (a traceback
    would bury it), after removing what Hydra wrote for the refused command (`remove_hydra_leftovers`). In a sweep
    Hydra reports the failed job itself (and ends the sweep's parent run); HYDRA_FULL_ERROR=1 shows the traceback
    anyway."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        yield
    except ConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        runs_dir = OmegaConf.select(cfg, "paths.runs_dir", default=None) if cfg is not None else None
        remove_hydra_leftovers(HydraConfig.get(), runs_dir)
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)


#: What Hydra writes into hydra.output_subdir before the job starts.
HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def remove_hydra_leftovers(hydra: DictConfig, runs_dir: str | None) -> None:
    """Undo what Hydra wrote for a command that was then refused: its copies of the config (hydra.output_subdir:
    `.hydra`, or `.hydra/<time>` in a folder that already held a run, see alignment.resume.hydra_subdir), and the
    run folder itself if that is left holding nothing but the job's log and lies under `<runs_dir>/single`, where
    new runs get their folders. Anything else stays: a resumed run's folder keeps its checkpoints, its log and its
    own `.hydra`, and a folder given with hydra.run.dir outside runs_dir is not ours to remove."""
    folder = Path(hydra.runtime.output_dir)
    if hydra.output_subdir:
        record = folder / hydra.output_subdir
        if record.is_dir() and not record.is_symlink() and \
                all(p.is_file() and p.name in HYDRA_RECORD for p in record.iterdir()):
            shutil.rmtree(record)
    if runs_dir is None or not folder.is_dir():
        return
    new_runs = (Path(runs_dir) / "single").resolve()
    if new_runs in folder.resolve().parents and \
            all(p.is_file() and p.name == f"{hydra.job.name}.log" for p in folder.iterdir()):
        shutil.rmtree(folder)
        with suppress(OSError):  # its date folder, if no other run is in it (rmdir removes only an empty one)
            if folder.parent.resolve() != new_runs:
                folder.parent.rmdir()
