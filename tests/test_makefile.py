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


def test_setup_without_the_venv_module_says_so_and_leaves_no_half_built_venv(tmp_path):
    """Debian's python3 without python3-venv: `-m venv` creates the folder and bin/python, then fails on ensurepip.
    The next `make` must not take that folder for a venv: it is removed, and the message says what to install."""
    python = tmp_path / "python3"
    python.write_text('#!/bin/sh\n# $1 $2 $3 = -m venv <folder>\nmkdir -p "$3/bin" && ln -s /bin/true "$3/bin/python"\n'
                      'echo "The virtual environment was not created successfully because ensurepip is not '
                      'available." && exit 1\n')
    python.chmod(0o755)
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-s", "setup", f"PYTHON={python}", f"VENV={venv}"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"{python} -m venv failed: install Python's venv module (Debian/Ubuntu: sudo apt-get install python3-venv)" \
        in out.stderr
    assert not venv.exists()


def test_setup_with_another_torch_on_an_existing_venv_says_how_to_switch():
    recipe = make_dry_run("setup", {}, "TORCH=torch --index-url https://download.pytorch.org/whl/cu124")
    assert "To switch builds: .venv/bin/pip install --force-reinstall torch --index-url " \
           "https://download.pytorch.org/whl/cu124" in recipe
    assert "switch builds" not in make_dry_run("setup", {})  # nothing to say when TORCH was not given
