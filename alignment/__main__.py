"""`python -m alignment [overrides]`: one experiment; `python -m alignment -m ...`: a sweep.

Examples:
    python -m alignment                                   # offline default: task=toxsen objective=conditional
    python -m alignment objective=awr task=toxicity
    python -m alignment -m task=tox,sen,toxsen,none       # study B's grid
    python -m alignment --help                            # every config group and its options
"""
import hydra
from omegaconf import DictConfig

from alignment import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from alignment.train import run  # heavy imports after Hydra has parsed the command line (fast --help)
    from alignment.validation import user_errors

    with user_errors():  # a ConfigError: its message alone, exit code 2
        metrics = run(cfg)
    return metrics.get("val/loss")  # what a sweeper (e.g. Optuna) minimises


if __name__ == "__main__":
    main()
