"""`python -m alignment [overrides]`: one experiment; `python -m alignment -m ...`: a sweep.

Examples:
    python -m alignment                                   # offline default: task=toxsen objective=conditional
    python -m alignment objective=awr task=toxicity
    python -m alignment -m task=tox,sen,toxsen,none       # study B's grid
    python -m alignment --help                            # every config group and its options
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from alignment import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from alignment.train import run  # heavy imports after Hydra has parsed the command line (fast --help)
    from alignment.validation import user_errors

    with user_errors(cfg):  # a ConfigError: its message alone, exit code 2
        metrics = run(cfg)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None  # only a sweeper reads the return value
    return optimized_value(metrics, cfg.optimized_metric)


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """What a sweeper (e.g. Optuna) minimises: the run's metric `name` (None: nothing)."""
    if name is None or not metrics:  # no metric asked for, or a DDP rank other than 0
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} is not among this run's metrics: {', '.join(sorted(metrics))}")
    return metrics[name]


if __name__ == "__main__":
    main()
