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


def _slurm_tasks(devices) -> int:
    """conf/hydra/launcher/slurm.yaml: one SLURM task per device, so the device count must be a number."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"hydra/launcher=slurm starts one task per device: give trainer.devices as a number of "
                         f"devices per node (e.g. trainer.devices=4), not {devices!r}")
    return devices


if not OmegaConf.has_resolver("slurm_tasks"):
    OmegaConf.register_new_resolver("slurm_tasks", _slurm_tasks)
    # A CPU trainer asks for no GPU (null: submitit then leaves --gpus-per-node out of the batch script).
    OmegaConf.register_new_resolver("slurm_gpus", lambda accelerator, devices:
                                    None if accelerator == "cpu" else _slurm_tasks(devices))


def _resume_dir(resume, tracking_uri, default):
    from alignment.resume import resume_dir  # imports torch: only when a config is resolved

    return resume_dir(resume, tracking_uri, default)


if not OmegaConf.has_resolver("resume_dir"):
    # conf/hydra/default.yaml: `resume=<run folder | run id>` runs in that run's folder.
    OmegaConf.register_new_resolver("resume_dir", _resume_dir)


def _hydra_subdir(output_dir, stamp):
    from alignment.resume import hydra_subdir

    return hydra_subdir(output_dir, stamp)


if not OmegaConf.has_resolver("hydra_subdir"):
    # conf/hydra/default.yaml: a resumed run's folder keeps its own .hydra record.
    OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir)
