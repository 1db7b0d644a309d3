"""The comparison: a tiny sweep through the real DVC queue, the table regenerated from MLflow, the UI."""

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest

from tests.helpers import CHROMIUM, environment, free_port, make_project, render, run, stop, venv_for, wait_for

SWEPT = ["default", "lr_x10"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, mnist_url):
    """Two settings swept through `dvc exp run --queue` in a project whose conf/ is shrunk, by two
    queue workers at once writing to the same SQLite store, each given its own (pretend) GPU."""
    project = make_project(tmp_path_factory.mktemp("sweep"), shrink_conf=True)
    env = environment(mnist_url)
    sweep = run(project, [sys.executable, "-m", "commands.sweep", "--jobs", "2", "--devices", "0,1", *SWEPT], env)
    compare = run(project, [sys.executable, "-m", "commands.compare", "--force"], env)  # fewer runs than committed
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    return project, env, sweep, compare, {run.info.run_name: run for run in runs}


@pytest.mark.slow
def test_sweep_logs_one_named_run_per_setting_grouped_by_sweep(tiny_sweep):
    project, _, sweep, _, runs = tiny_sweep
    assert "database is locked" not in sweep.stdout + sweep.stderr
    client = mlflow.MlflowClient()
    for tracked in runs.values():  # complete despite two concurrent writers
        assert {"val_accuracy", "test_accuracy", "f1_macro"} <= tracked.data.metrics.keys()
        assert len(client.list_artifacts(tracked.info.run_id, "error_analysis")) == 5
    assert sorted(runs) == ["default-seed0", "lr_x10-seed0"]
    assert {run.data.params["train.learning_rate"] for run in runs.values()} == {"0.001", "0.01"}
    assert len({run.data.tags["sweep"] for run in runs.values()}) == 1
    # One device per queue worker; the experiments ran at once, one on each worker.
    assert "queue worker 2 uses CUDA_VISIBLE_DEVICES=1" in sweep.stderr
    assert sorted(run.data.tags["env.cuda_visible_devices"] for run in runs.values()) == ["0", "1"]
    assert {run.data.tags["dvc.exp_name"] for run in runs.values()} == set(runs)
    # Queued experiments run in temporary copies; the store and artifacts must outlive them.
    for tracked in runs.values():
        assert tracked.info.status == "FINISHED"
        assert tracked.info.artifact_uri.startswith(f"file://{project}/mlartifacts/")


@pytest.mark.slow
def test_table_is_regenerated_from_the_tracked_runs(tiny_sweep):
    project, _, _, _, runs = tiny_sweep
    table = pd.read_csv(project / "reports/comparison.csv").set_index("setting")
    measured = table[table.n > 0]
    assert sorted(measured.index) == sorted(SWEPT)
    for setting in SWEPT:
        run = runs[f"{setting}-seed0"]
        assert measured.loc[setting, "test_accuracy_mean"] == pytest.approx(
            run.data.metrics["test_accuracy"], abs=1e-12
        )
        assert measured.loc[setting, "run_ids"] == run.info.run_id
    assert table.loc["epochs_x10", "n"] == 0 and table.loc["epochs_x10", "claimed_test_accuracy"] == 0.9935
    per_class = pd.read_csv(project / "reports/comparison_per_class.csv")
    assert list(per_class.digit) == list(range(10)) and set(SWEPT) <= set(per_class.columns)
    assert (project / "reports/comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "†" not in (project / "reports/comparison.md").read_text()  # the sweep's runs are of committed code


@pytest.mark.slow
def test_second_sweep_trains_nothing(tiny_sweep):
    project, env, _, _, runs = tiny_sweep
    again = run(project, [sys.executable, "-m", "commands.sweep", *SWEPT], env)
    assert again.stderr.count("already tracked") == 2
    assert len(mlflow.search_runs(experiment_names=["mnist"], output_format="list")) == len(runs)


@pytest.mark.slow
def test_a_sweep_never_stands_on_a_run_of_uncommitted_code(tmp_path, mnist_url):
    """An experiment DVC restores from its run cache logs nothing: the earlier run it stands for must
    be of committed code, or `make reproduce RUN=` could not rebuild the table's row."""
    project = make_project(tmp_path, shrink_conf=True)
    env = environment(mnist_url)
    edited = project / "pipeline/errors.py"  # tracked, but no stage's input: git says dirty, DVC sees the same stages
    committed = edited.read_text()
    edited.write_text(committed + "# an edit not yet committed\n")
    run(project, ["dvc", "exp", "run", "-S", "+experiment=default", "-S", "train.seed=0"], env)  # fills the run cache
    edited.write_text(committed)

    result = run(project, [sys.executable, "-m", "commands.sweep", "default"], env, check=False)

    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: sweep: DVC restored default-seed0 from its run cache, and the only run of that config was logged from "
        "uncommitted code (tag git.dirty), which `make reproduce RUN=` cannot rebuild; retrain with "
        '`make sweep SETTINGS="default" FORCE=1`'
    ]
    # The comparison table still shows the run, marked, and says what makes it rebuildable.
    run(project, [sys.executable, "-m", "commands.compare", "--force"], env)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [dirty] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    markdown = (project / "reports/comparison.md").read_text()
    assert f"| `{dirty.info.run_id[:8]}`† |" in markdown
    assert (
        "† Logged from uncommitted code (tag `git.dirty`): no commit rebuilds it with `make reproduce RUN=`. "
        'Commit the code and conf/, then `make sweep SETTINGS="default" FORCE=1`.'
    ) in markdown


@pytest.mark.slow
def test_a_queued_experiment_runs_its_preset_as_it_was_queued(tmp_path, mnist_url):
    """A preset edited after its experiment was queued (say, while the sweep runs) does not reach the
    experiment: it trains the queued config, and its run is of the committed code."""
    project = make_project(tmp_path, shrink_conf=True)
    env = environment(mnist_url)
    queue = (
        "from commands.sweep import queue_experiment; "
        "queue_experiment('lr_x10-seed0', 'lr_x10', ['+experiment=lr_x10', 'train.seed=0'], False)"
    )
    run(project, [sys.executable, "-c", queue], env)
    preset = project / "conf/experiment/lr_x10.yaml"
    preset.write_text(preset.read_text().replace("learning_rate: 0.01", "learning_rate: 0.02"))

    run(project, ["dvc", "exp", "run", "--run-all"], env)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [trained] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert trained.info.run_name == "lr_x10-seed0"
    assert trained.data.params["train.learning_rate"] == "0.01"
    assert trained.data.tags["git.dirty"] == "false"


@pytest.fixture
def mlflow_ui(tiny_sweep):
    """`make ui` on a free loopback port, over the sweep's store; stopped with its workers."""
    project, env, _, _, _ = tiny_sweep
    venv_for(project)
    port = free_port()
    server = subprocess.Popen(
        ["make", "ui", f"PORT={port}", "UI_ARGS=--workers 1"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server)
        yield url, port
    finally:
        stop(server)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_ui_shows_the_sweep(tiny_sweep, mlflow_ui, tmp_path):
    _, _, _, _, runs = tiny_sweep
    mlflow_ui, port = mlflow_ui
    listeners = [
        connection
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]
    listening = {connection.laddr.ip for connection in listeners}
    assert listening == {"127.0.0.1"}, f"make ui must listen on loopback only, not {listening}"
    for connection in listeners:  # nor does it pass the UI's usage events on to MLflow's makers
        assert psutil.Process(connection.pid).environ().get("MLFLOW_DISABLE_TELEMETRY") == "true"
    experiment = next(iter(runs.values())).info.experiment_id
    screenshots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    screenshots.mkdir(parents=True, exist_ok=True)

    runs_page = render(f"{mlflow_ui}/#/experiments/{experiment}/runs", screenshots / "ui-runs.png")
    assert "default-seed0" in runs_page and "lr_x10-seed0" in runs_page

    ids = urllib.parse.quote(json.dumps([run.info.run_id for run in runs.values()]))
    compare_page = render(
        f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([experiment]))}",
        screenshots / "ui-compare.png",
    )
    for visible in ("default-seed0", "lr_x10-seed0", "train.learning_rate", "f1_macro"):
        assert visible in compare_page, f"{visible!r} not shown in the compare view"
    assert (screenshots / "ui-compare.png").stat().st_size > 10_000
    print(f"screenshots: {screenshots / 'ui-runs.png'} {screenshots / 'ui-compare.png'}")
