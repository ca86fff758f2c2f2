"""alignment: train language models to follow human preferences with control tokens and
preference-aware objectives, and measure how well it worked.

Data flows one way: source -> sentences -> scores -> tags -> tokens -> batches -> objective
-> model -> samples -> scores -> metrics -> MLflow.
"""
from pathlib import Path

from omegaconf import OmegaConf

#: The checkout (or install) root: `conf/` and `runs/` live here. Configs say `${project_root:}`
#: so outputs never depend on the working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
