"""The comparison: a tiny sweep through the real DVC queue, the table regenerated from MLflow, the UI."""

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
from scipy import stats

from pipeline.tracking import runs_path
from tests.helpers import CHROMIUM, REPO, environment, free_port, make_project, render, run, stop, venv_for, wait_for

SWEPT = ["default", "lr_x10"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, mnist_url):
    """Two settings swept through `dvc exp run --queue` in a project whose conf/ is shrunk, by two
    queue workers at once writing to the same SQLite store, each given its own (pretend) GPU."""
    project = make_project(tmp_path_factory.mktemp("sweep"), shrink_conf=True)
    env = environment(mnist_url)
    sweep = run(
        project,
        [sys.executable, "-m", "commands.sweep", "--jobs", "2", "--devices", "0,1", "--seeds", "2", *SWEPT],
        env,
    )
    compare = run(project, [sys.executable, "-m", "commands.compare", "--force"], env)  # fewer runs than committed
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    return project, env, sweep, compare, {run.info.run_name: run for run in runs}


SWEEP_RUNS = ["default-seed0", "default-seed1", "lr_x10-seed0", "lr_x10-seed1"]


@pytest.mark.slow
def test_sweep_logs_one_named_run_per_setting_grouped_by_sweep(tiny_sweep):
    project, _, sweep, _, runs = tiny_sweep
    assert "database is locked" not in sweep.stdout + sweep.stderr
    client = mlflow.MlflowClient()
    for tracked in runs.values():  # complete despite two concurrent writers
        assert {"val_accuracy", "test_accuracy", "f1_macro"} <= tracked.data.metrics.keys()
        assert len(client.list_artifacts(tracked.info.run_id, "error_analysis")) == 5
    assert sorted(runs) == SWEEP_RUNS
    assert {run.data.params["train.learning_rate"] for run in runs.values()} == {"0.001", "0.01"}
    assert len({run.data.tags["sweep"] for run in runs.values()}) == 1
    # One device per queue worker; the experiments ran at once, one on each worker.
    assert "queue worker 2 uses CUDA_VISIBLE_DEVICES=1" in sweep.stderr
    assert sorted(set(run.data.tags["env.cuda_visible_devices"] for run in runs.values())) == ["0", "1"]
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
    accuracies = {}
    for setting in SWEPT:
        seeds = [runs[f"{setting}-seed{seed}"] for seed in (0, 1)]
        accuracies[setting] = [run.data.metrics["test_accuracy"] for run in seeds]
        assert measured.loc[setting, "test_accuracy_mean"] == pytest.approx(np.mean(accuracies[setting]), abs=1e-12)
        assert measured.loc[setting, "run_ids"] == " ".join(run.info.run_id for run in seeds)
    # lr_x10 against the default: Welch's interval of the tracked accuracies, as scipy computes it.
    welch = stats.ttest_ind(accuracies["lr_x10"], accuracies["default"], equal_var=False)
    interval = welch.confidence_interval(0.95)
    row = measured.loc["lr_x10"]
    assert row.difference == pytest.approx(np.mean(accuracies["lr_x10"]) - np.mean(accuracies["default"]), abs=1e-12)
    assert (row.difference_low, row.difference_high) == pytest.approx((interval.low, interval.high), abs=1e-12)
    assert row.welch_dof == pytest.approx(welch.df)
    expected = "better" if interval.low > 0 else "worse" if interval.high < 0 else "not distinguishable with 2 seeds"
    assert row.verdict == expected
    points = [f"{value * 100:+.2f}".replace("-", "−") for value in (row.difference, interval.low, interval.high)]
    line = next(line for line in (project / "reports/comparison.md").read_text().splitlines() if "| lr_x10 |" in line)
    assert f"| {points[0]} pp [{points[1]}, {points[2]}]: {expected} |" in line
    assert table.loc["epochs_x10", "n"] == 0 and table.loc["epochs_x10", "claimed_test_accuracy"] == 0.9935
    per_class = pd.read_csv(project / "reports/comparison_per_class.csv")
    assert list(per_class.digit) == list(range(10)) and set(SWEPT) <= set(per_class.columns)
    assert (project / "reports/comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "†" not in (project / "reports/comparison.md").read_text()  # the sweep's runs are of committed code


@pytest.mark.slow
def test_make_runs_shows_accuracy_and_every_varied_param(tiny_sweep):
    project, env, _, _, runs = tiny_sweep
    venv_for(project)
    env = {key: value for key, value in env.items() if key != "COLUMNS"}  # as a shell passes it: unset
    shown = run(project, ["make", "--no-print-directory", "runs"], env).stdout
    print(shown)
    lines = shown.splitlines()
    header = next(line for line in lines if "Experiment" in line).split()
    # The queue's State says which ran to their end (a failed one would show its parent's metrics).
    assert header == ["Experiment", "State", "test_accuracy", "train.learning_rate", "train.seed"]  # none cut to …
    capped = run(project, ["make", "--no-print-directory", "runs"], {**env, "COLUMNS": "60"}).stdout
    assert max(map(len, capped.splitlines())) <= 60 and "…" in capped
    for name in runs:
        assert "Success" in next(line for line in lines if f"[{name}]" in line)
    accuracies = [float(line.split()[-3]) for line in lines if "-seed" in line]
    assert accuracies == sorted(accuracies, reverse=True)  # best first


@pytest.mark.slow
def test_second_sweep_trains_nothing(tiny_sweep):
    project, env, _, _, runs = tiny_sweep
    again = run(project, [sys.executable, "-m", "commands.sweep", "--seeds", "2", *SWEPT], env)
    assert again.stderr.count("already tracked") == len(SWEEP_RUNS)
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


def best_name(runs: dict) -> str:
    return max(runs, key=lambda name: runs[name].data.metrics["test_accuracy"])


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

    # The experiment in the Model training mode (the sidebar's toggle, or the URL's workflowType): its
    # runs table, not the GenAI overview.
    landing = render(
        f"{mlflow_ui}/#/experiments/{experiment}?workflowType=machine_learning", screenshots / "ui-experiment.png"
    )
    assert "default-seed0" in landing and "lr_x10-seed0" in landing
    # `make ui`'s link: the saved view, sorted by test accuracy, with its column and the params that vary.
    runs_page = render(f"{mlflow_ui}/{runs_path(experiment)}", screenshots / "ui-runs.png")
    assert "default-seed0" in runs_page and "lr_x10-seed0" in runs_page
    for column in ("test_accuracy", "train.batch_size", "train.learning_rate"):  # the first of the window's width
        assert column in runs_page, f"{column!r} is not a column of the runs table"
    charts = render(f"{mlflow_ui}/{runs_path(experiment)}&compareRunsMode=CHART", screenshots / "ui-charts.png")
    # A line card of several metrics labels each line "<run> (<metric>)": validation beside training.
    assert f"{best_name(runs)} (val_accuracy)" in charts and f"{best_name(runs)} (accuracy)" in charts
    best = runs[best_name(runs)]
    run_page = render(
        f"{mlflow_ui}/#/experiments/{experiment}/runs/{best.info.run_id}/model-metrics?workflowType=machine_learning",
        screenshots / "ui-run.png",
    )
    assert f"{best.info.run_name} (accuracy)" in run_page  # a chart's legend: the epochs' points are there
    project = tiny_sweep[0]
    run(project, [sys.executable, "-m", "commands.model_server", "promote", "--run", best.info.run_id], tiny_sweep[1])
    version_page = render(
        f"{mlflow_ui}/#/models/mnist-classifier/versions/1?workflowType=machine_learning",
        screenshots / "ui-model-version.png",
    )
    assert f"{best.data.metrics['test_accuracy']:.2%}" in version_page and "git.commit" in version_page

    ids = urllib.parse.quote(json.dumps([run.info.run_id for run in runs.values()]))
    compare_page = render(
        f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([experiment]))}",
        screenshots / "ui-compare.png",
    )
    for visible in ("default-seed0", "lr_x10-seed0", "train.learning_rate", "f1_macro"):
        assert visible in compare_page, f"{visible!r} not shown in the compare view"
    assert (screenshots / "ui-compare.png").stat().st_size > 10_000
    print(f"screenshots: {sorted(str(path) for path in screenshots.glob('ui-*.png'))}")


# The samples: accuracies of the committed table's size (3 seeds), unequal spreads, and unequal counts.
FIXED_SAMPLES = [
    ([0.9791, 0.9812, 0.9763], [0.9801, 0.9755, 0.9806]),
    ([0.9620, 0.9571, 0.9687], [0.9801, 0.9755, 0.9806]),
    ([0.9953, 0.9949, 0.9948, 0.9951], [0.9801, 0.9755, 0.9806]),
]


@pytest.mark.parametrize(("setting", "baseline"), FIXED_SAMPLES)
def test_welch_interval_is_scipys(setting, baseline):
    from commands.compare import welch_interval

    ours = welch_interval(np.array(setting), np.array(baseline))
    theirs = stats.ttest_ind(setting, baseline, equal_var=False)
    interval = theirs.confidence_interval(0.95)
    assert ours["difference"] == pytest.approx(np.mean(setting) - np.mean(baseline), abs=1e-15)
    assert (ours["low"], ours["high"]) == pytest.approx((interval.low, interval.high), abs=1e-12)
    assert ours["dof"] == pytest.approx(theirs.df, rel=1e-12)


def test_verdicts_follow_the_interval():
    from commands.compare import verdict, welch_interval

    verdicts = [
        verdict(welch_interval(np.array(setting), np.array(baseline)), len(setting), len(baseline))
        for setting, baseline in FIXED_SAMPLES
    ]
    assert verdicts == ["not distinguishable with 3 seeds", "worse", "better"]
    single = welch_interval(np.array([0.97]), np.array([0.98, 0.97]))
    assert np.isnan(single["low"]) and verdict(single, 1, 2) == "needs 2 seeds of each"
    assert verdict(welch_interval(np.array([0.97, 0.96]), np.array([0.98, 0.97, 0.99])), 2, 3) == (
        "not distinguishable with 2 and 3 seeds"
    )


def test_seeds_for_a_half_width_are_the_fewest_that_reach_it():
    from commands.compare import seeds_for, welch_from_summary

    def half_width(seeds, baseline_seeds):
        interval = welch_from_summary((0.0, 0.0017, seeds), (0.0, 0.0030, baseline_seeds))
        return (interval["high"] - interval["low"]) / 2

    equal = seeds_for(0.002, 0.0017, 0.0030)
    assert half_width(equal, equal) <= 0.002 < half_width(equal - 1, equal - 1)
    against_14 = seeds_for(0.002, 0.0017, 0.0030, baseline_seeds=14)
    assert half_width(against_14, 14) <= 0.002 < half_width(against_14 - 1, 14)
    assert seeds_for(0.001, 0.0017, 0.0030, baseline_seeds=3) is None  # the default's 3 seeds alone are too few


def test_plan_reads_the_committed_table():
    result = run(REPO, [sys.executable, "-m", "commands.compare", "--plan", "0.2"], os.environ.copy())
    lines = result.stdout.splitlines()
    assert lines[0] == "seeds for a 95% interval of ±0.2 pp against default (from reports/comparison.csv):"
    assert any(line.split()[0] == "lr_x10" and "already" in line for line in lines[1:])
    bad = run(REPO, [sys.executable, "-m", "commands.compare", "--plan", "0"], os.environ.copy(), check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: compare: --plan takes a half-width in percentage points above 0, e.g. 0.2; got 0.0"
    ]
