"""`make ui` and `make clean-cache` act on the store and caches the experiments use (conf/paths/default.yaml)."""
from __future__ import annotations

import os
import subprocess

from alignment import PROJECT_ROOT


def make_dry_run(target: str, env: dict[str, str], *args: str) -> str:
    """The commands `make <target>` would run (-n), with the environment `env` and without (re)building .venv."""
    environ = {k: v for k, v in os.environ.items() if k not in ("ALIGNMENT_RUNS_DIR", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", target, *args], cwd=PROJECT_ROOT,
                         env={**environ, **env}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ui_opens_the_store_of_alignment_runs_dir_on_the_given_port():
    recipe = make_dry_run("ui", {"ALIGNMENT_RUNS_DIR": "/shared/runs"}, "PORT=5002")
    assert ".venv/bin/mlflow ui --backend-store-uri sqlite:////shared/runs/mlflow.db --host 127.0.0.1 --port 5002" \
        in recipe
    default = make_dry_run("ui", {})
    assert f"--backend-store-uri sqlite:///{PROJECT_ROOT}/runs/mlflow.db --host 127.0.0.1 --port 5000" in default
    # What a run prints when it logged elsewhere (alignment.tracking.ui_command).
    other = make_dry_run("ui", {"ALIGNMENT_RUNS_DIR": "/shared/runs"}, "TRACKING_URI=sqlite:////elsewhere/mlflow.db")
    assert "--backend-store-uri sqlite:////elsewhere/mlflow.db --host" in other


def test_ui_of_a_tracking_server_says_to_open_the_server():
    recipe = make_dry_run("ui", {"MLFLOW_TRACKING_URI": "http://tracking:5000", "ALIGNMENT_RUNS_DIR": "/shared"})
    said = subprocess.run(["sh", "-c", recipe], capture_output=True, text=True, timeout=30).stdout
    assert said == "http://tracking:5000 is a tracking server: open it in a browser\n"


def test_clean_cache_forgets_the_caches_of_alignment_runs_dir():
    assert make_dry_run("clean-cache", {"ALIGNMENT_RUNS_DIR": "/shared/runs"}).strip() == \
        "rm -rf /shared/runs/cache/datasets /shared/runs/cache/tokenizers"
