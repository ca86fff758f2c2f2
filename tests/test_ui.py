"""The MLflow UI as a user sees it: a real `mlflow server`, a two-job sweep tracked there, and the pages the sweep
prints links to opened in headless Chromium (Debian's `chromium` package), whose rendered DOM must show the runs,
the parameters that define them and their headline metrics. Screenshots are kept under the test's runs/ui/."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.conftest import TINY
from tests.test_distributed import run_alignment
from tests.test_sweeps import mlflow_server  # noqa: F401  (a fixture)

CHROMIUM = shutil.which("chromium")


def browse(url: str, profile: Path, *flags: str) -> str:
    """Chromium's rendering of `url` once the page's scripts settled (virtual time: no real 20 s wait);
    a fresh profile each time, so no view state saved by an earlier visit changes what the page shows."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--virtual-time-budget=20000", "--timeout=90000",  # on a loaded machine: stop waiting after 90 s
               f"--user-data-dir={profile}", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout


def printed_link(output: str, label: str) -> str:
    return [line.split(label, 1)[1].strip() for line in output.splitlines() if line.startswith(f"  {label}")][-1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian/Ubuntu: apt-get install chromium)")
def test_the_printed_links_show_the_runs_and_their_headline_metrics(tmp_path, runs_dir, mlflow_server):  # noqa: F811
    url, _ = mlflow_server
    runs = tmp_path / "runs"
    output = run_alignment(["-m", "task=tox,none", *TINY, "eval.curve.every_n_steps=3", "eval.curve.num_samples=4",
                            f"paths.cache_dir={runs_dir / 'cache'}"], runs, timeout=900, tracking_uri=url)
    client = mlflow.MlflowClient(url)
    experiment_id = client.get_experiment_by_name("alignment").experiment_id
    found = client.search_runs([experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in found if r is not parent}
    assert sorted(children) == ["none-conditional", "tox-conditional"]

    # The sweep's report (tables and plots) is on its parent run; each job has its own alignment-curve plot.
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/runs.csv", "report/alignment_curves.png"} <= report
    for child in children.values():
        assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/alignment_curve.png"]

    runs_table = printed_link(output, "runs table:")
    assert runs_table == f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" \
                         "&viewStateShareKey=headline"
    compare = printed_link(output, "compare:")
    assert all(child.info.run_id in compare for child in children.values())
    headline = ["_summary/aligned_misaligned", "_summary/unconditioned_misaligned", "_summary/val_loss_untagged"]
    assert all(key in child.data.metrics for key in headline for child in children.values())

    shots = runs / "ui"
    shots.mkdir(parents=True)
    for page, link in (("runs_table", runs_table), ("compare", compare)):
        # wide enough for every column of the view: the table leaves out of the DOM the columns it does not draw
        dom = browse(link, tmp_path / f"profile-{page}", "--window-size=2000,1200", "--dump-dom")
        (shots / f"{page}.html").write_text(dom)
        browse(link, tmp_path / f"profile-{page}-shot", "--window-size=2000,1200", f"--screenshot={shots}/{page}.png")
        assert (shots / f"{page}.png").stat().st_size > 10_000, f"{page}: blank screenshot?"
        for name, child in children.items():
            assert name in dom, f"{page}: run {name} missing"
            assert f">{child.data.params['_run/task']}<" in dom, f"{page}: _run/task of {name} missing"
        for key in headline + ["_run/task", "_run/objective", "_run/seed"]:
            assert key in dom, f"{page}: {key} missing"
        if page == "compare":
            # The plot (at the top) shows the run-defining parameters that differ, coloured by the headline
            # metric; the tables below list the parameters and the metrics sorted, `_run/` and `_summary/` first.
            assert dom.index("_run/task") < dom.index("datamodule/batch_size")
            text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
            assert re.search(r"Parameters: _run/task .*Metrics: _summary/aligned_misaligned ", text), "plot axes"
            assert text.split("Metrics Show diff only ", 1)[1].startswith("_summary/aligned_misaligned _summary/")
