"""`python -m alignment.data [overrides]`: build (or find in the cache) the dataset of an
experiment config without training, and print its statistics.

    python -m alignment.data task=toxsen data=tweets
    python -m alignment.data task=pep8 data=python_code objective=conditional
"""
import json

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from alignment import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.datamodule)
    datamodule.prepare_data()
    meta = datamodule.meta
    print(f"Dataset: {datamodule.folder}")
    print(f"Control tokens: {' '.join(meta['control_tokens']) or '(none)'}")
    print(f"Thresholds: {json.dumps(meta['thresholds'])}")
    if meta.get("filter_threshold") is not None:
        print(f"Filter threshold (combined misalignment): {meta['filter_threshold']:.4g}")
    width = max(len(k) for k in meta["stats"])
    for key, value in meta["stats"].items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
