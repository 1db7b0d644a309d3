"""First contact: each command a new user types does what it says, or fails in one line that says why."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
import yaml

from tests.helpers import (
    CI_MARKERS,
    MAKE,
    REPO,
    environment,
    error_lines,
    free_port,
    git,
    make_project,
    run,
    stop,
)


@pytest.mark.slow
def test_dvc_repro_after_a_conf_edit_runs_with_the_edited_value(tmp_path, mnist_url):
    project = make_project(tmp_path)  # params.yaml from conf/ with the tiny overrides recorded
    env = environment(mnist_url)
    run(project, ["dvc", "repro", "preprocess"], env)
    conf = project / "conf/config.yaml"
    conf.write_text(conf.read_text().replace("split_seed: 0", "split_seed: 1"))

    status = run(project, ["dvc", "status"], env).stdout
    assert "params:" in status and "modified:" in status and "conf" in status, status
    result = run(project, ["dvc", "repro", "preprocess"], env)
    assert (
        "params: conf/ changed; recomposed params.yaml with data.limit=300 train.epochs=1: data.split_seed: 0 -> 1"
    ) in result.stderr
    assert "Running stage 'preprocess'" in result.stdout
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["config"]["split_seed"] == 1 and manifest["config"]["limit"] == 300  # overrides kept
    again = run(project, ["dvc", "repro", "preprocess"], env)
    assert "Running stage" not in again.stdout


def test_params_that_disagree_with_conf_and_record_nothing_stop_dvc_repro(tmp_path, mnist_url):
    """As `dvc exp apply` leaves params.yaml: neither conf/ nor params.yaml wins silently."""
    project = make_project(tmp_path)
    params = project / "params.yaml"
    params.write_text(params.read_text().partition("\n")[2])  # without the header make params writes
    result = run(project, ["dvc", "repro"], environment(mnist_url), check=False)
    assert result.returncode != 0
    [line] = error_lines(result.stderr)
    assert line == (
        "error: params: params.yaml is not the composition of conf/ and records no composition (`dvc exp run`, "
        "`dvc exp apply` or an edit by hand wrote it): data.limit is 300 there, None in conf/; "
        "train.epochs is 1 there, 5 in conf/. Put the change in conf/ or an override "
        '(`make params OVERRIDES="key=value ..."`), or discard it: `make reset` returns the workspace to the '
        "committed configuration"
    )
    assert "Traceback" not in result.stderr
    assert not (project / "data/raw").exists()


@pytest.mark.slow
def test_dvc_knows_every_module_that_shapes_a_stage_output(tmp_path, mnist_url):
    project = make_project(tmp_path)
    env = environment(mnist_url)
    run(project, ["dvc", "repro", "preprocess"], env)
    data_io = project / "pipeline/data_io.py"
    data_io.write_text(data_io.read_text() + "\n# a change to the IDX parser or the array format\n")
    status = run(project, ["dvc", "status", "preprocess"], env).stdout
    assert "preprocess:" in status and "modified:           pipeline/data_io.py" in status, status
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {
        "pipeline/models.py",
        "pipeline/data_io.py",
        "pipeline/numerics.py",
        "pipeline/tracking.py",
        "requirements.lock",
    } <= set(stages["train"]["deps"])
    for stage in ("download", "preprocess", "train", "evaluate", "error-analysis"):
        assert "pipeline/data_io.py" in stages[stage]["deps"], stage


def test_the_committed_dvc_lock_matches_the_committed_code_and_params(mnist_url):
    """Otherwise a clone's `dvc repro` retrains from code that no committed result came from."""
    tracked = set(git(REPO, "ls-files").splitlines())
    status = json.loads(run(REPO, ["dvc", "status", "--json"], environment(mnist_url)).stdout)
    stale = {
        stage: path
        for stage, changes in status.items()
        for change in changes
        for path in change.get("changed deps", {})
        if path.rstrip("/") in tracked | {"conf"}
    }
    assert not stale, f"dvc.lock is older than {stale}: run `dvc repro` and commit dvc.lock"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key 'train.epoch'; allowed in train: learning_rate, batch_size, epochs,"),
        ("model=resnet", "Could not find 'model/resnet'"),
        ("train.epochs=[", "no viable alternative at input '['"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("target", ["params", "run"])
def test_make_params_and_run_refuse_a_bad_override_in_one_line(tmp_path, mnist_url, override, message, target):
    project = make_project(tmp_path)
    before = (project / "params.yaml").read_bytes()
    result = run(project, [*MAKE, target, f"OVERRIDES={override}"], environment(mnist_url), check=False)
    assert result.returncode != 0
    [line] = error_lines(result.stderr)
    assert line.startswith("error: params: ") and message in line, line
    assert "Traceback" not in result.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert not (project / "data/raw").exists()  # `make run` started no stage


@pytest.mark.slow
def test_make_run_with_overrides_composes_them_then_runs_the_pipeline(tmp_path, mnist_url):
    project = make_project(tmp_path)
    overrides = "data.limit=300 train.epochs=1 train.seed=3"
    result = run(project, [*MAKE, "run", f"OVERRIDES={overrides}"], environment(mnist_url))
    assert "Results: test accuracy" in result.stderr
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["seed"] == 3 and params["data"]["limit"] == 300
    header = (project / "params.yaml").read_text().partition("\n")[0]
    assert all(override in header for override in overrides.split()), header  # recorded for the params stage
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [trained] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert trained.info.status == "FINISHED" and trained.data.params["train.seed"] == "3"
    again = run(project, [*MAKE, "run"], environment(mnist_url))  # the overrides stay until `make params`
    assert "Running stage" not in again.stdout


def test_dvc_exp_run_from_a_subfolder_is_one_line_and_writes_nothing(tmp_path, mnist_url):
    project = make_project(tmp_path)
    result = run(project / "conf", ["dvc", "exp", "run", "-S", "train.seed=5"], environment(mnist_url), check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"ERROR: run `dvc exp run` from the project's root, {project}, not from conf/: `cd {project}`"
    )
    assert sorted(path.name for path in (project / "conf").iterdir()) == [
        "config.yaml",
        "experiment",
        "model",
        "search",
    ]
    assert git(project, "status", "--porcelain") == ""


def test_make_help_shows_the_values_it_will_use():
    result = subprocess.run([*MAKE, "help", "PORT=6123"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "$(" not in result.stdout, [line for line in result.stdout.splitlines() if "$(" in line]
    assert "http://127.0.0.1:6123" in result.stdout and "(default 30)" in result.stdout


def test_make_ui_on_a_busy_port_fails_in_one_line(mnist_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*MAKE, "ui", f"PORT={port}"],
            cwd=REPO,
            env=environment(mnist_url),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: ui: cannot serve the UI on 127.0.0.1:{port} (Address already in use); stop what uses the port "
        f"(another `make ui`?) or choose another: `make ui PORT={port + 1}`"
    ]


@pytest.mark.slow
def test_make_ui_prints_its_link_when_the_ui_answers_and_nothing_else_until_ctrl_c(tmp_path, mnist_url):
    project = make_project(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [*MAKE, "ui", f"PORT={port}", "UI_ARGS=--workers 1"],
        cwd=project,
        env=environment(mnist_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with ThreadPoolExecutor(1) as reader:
            first = reader.submit(server.stdout.readline).result(timeout=180)
        # A click at once works: the server answers as soon as the link is there, and logs no request.
        for path in ("/health", "/"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).close()
        time.sleep(2)
        os.killpg(server.pid, signal.SIGINT)  # a Ctrl-C in its terminal
        server.wait(timeout=60)
        with pytest.raises(ConnectionRefusedError):  # the server and its workers have stopped
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        stop(server)
    # make's own line about the stopped recipe ("make: ***", or "make[1]: ***" under `make test`).
    rest = [line for line in server.stdout.read().splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert first.startswith(f"Training runs: http://127.0.0.1:{port}/#/experiments/1/runs"), first
    assert rest == [], rest


def test_compare_never_replaces_the_committed_table_with_a_poorer_one(tmp_path, mnist_url):
    project = make_project(tmp_path)  # the committed reports/comparison.*
    mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_experiments()  # an empty store (a missing
    # one is reported as such: test_mistakes.py)
    kept = sorted((project / "reports").glob("comparison*"))
    before = {path: path.read_bytes() for path in kept}
    result = run(project, [sys.executable, "-m", "commands.compare"], environment(mnist_url), check=False)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    committed = pd.read_csv(project / "reports/comparison.csv").set_index("setting").n  # runs per setting
    assert f"holds fewer runs than reports/comparison.csv for default (0 of {committed['default']} runs)" in line
    assert f'`make sweep SETTINGS="{" ".join(committed.index)}" SEEDS={committed.max()}`' in line
    assert "`make compare FORCE=1`" in line
    assert {path: path.read_bytes() for path in kept} == before


@pytest.mark.slow
def test_a_cpu_run_speaks_to_people(pipeline_run):
    """No CUDA probing errors, C++ or MLflow notices, or ignored-argument warnings; then where results are."""
    _, _, result = pipeline_run
    output = result.stdout + result.stderr
    for noise in (
        "cuInit",
        "E0000",
        "oneDNN custom operations",
        "absl::InitializeLog",
        "was passed, but will be ignored",
        "INFO mlflow",
        "alembic",
    ):
        assert noise not in output, f"{noise!r} in the output of `dvc repro`"
    assert "Results: test accuracy" in result.stderr and "reports/metrics.json" in result.stderr
    assert "reports/error_analysis/misclassified.png" in result.stderr and "`make ui`" in result.stderr


def test_make_ui_link_opens_the_runs_table_sorted_by_test_accuracy(tmp_path, mnist_url):
    project = make_project(tmp_path)
    port = free_port()
    result = run(
        project, [sys.executable, "-m", "pipeline.tracking", "runs-url", "--port", str(port)], environment(mnist_url)
    )
    assert result.stdout.strip() == (
        f"Training runs: http://127.0.0.1:{port}/#/experiments/1/runs"
        "?viewStateShareKey=training-runs&workflowType=machine_learning"
    )
    # The view the link names exists before any training (the experiment is created with it).
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    assert "mlflow.sharedViewState.training-runs" in mlflow.get_experiment("1").tags


def test_mlflow_sends_no_usage_events_unless_asked(tmp_path):
    """MLflow 3 reports usage to its makers by default; no entry point of the pipeline does, in CI or not."""
    check = [
        sys.executable,
        "-c",
        "from pipeline import runtime; runtime.apply_defaults(); "
        "import mlflow.telemetry.utils as telemetry; print(telemetry.is_telemetry_disabled())",
    ]
    outside_ci = {key: value for key, value in environment("").items() if key not in CI_MARKERS}
    assert subprocess.run(check, cwd=REPO, env=outside_ci, capture_output=True, text=True).stdout.strip() == "True"
    asked = {**outside_ci, "MLFLOW_DISABLE_TELEMETRY": "false"}
    assert subprocess.run(check, cwd=REPO, env=asked, capture_output=True, text=True).stdout.strip() == "False"
