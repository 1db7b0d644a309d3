"""The tracking store fails too: each fault a user can cause is one `error:` line, the stage's previous
outputs stay byte for byte, and the store is left as it was and still opens."""

import http.server
import re
import sqlite3
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from tests.helpers import QuietHandler, error_lines, free_port, run_stage_process, stop, wait_for, written_files

pytestmark = pytest.mark.slow  # each test works on a copy of a tiny trained project


def outputs(project) -> dict:
    return {
        path: path.read_bytes()
        for folder in ("models", "reports", "data/predictions")
        for path in written_files(project / folder)
    }


def assert_one_line(result, *fragments) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return line


def store(project) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.parametrize("name", ["evaluate", "error_analysis"])
def test_deleted_run(trained_copy, name):
    project, env = trained_copy
    [tracked] = store(project).search_runs(["1"])
    store(project).delete_run(tracked.info.run_id)
    before = outputs(project)
    result, _ = run_stage_process(project, env, name)
    assert_one_line(
        result,
        f"MLflow run {tracked.info.run_id} (from models/run.json) is deleted in",
        f"mlflow runs restore --run-id {tracked.info.run_id}",
        "`dvc repro --force train`",
    )
    assert outputs(project) == before
    assert store(project).get_run(tracked.info.run_id).info.lifecycle_stage == "deleted"  # left as it was


def test_deleted_experiment(trained_copy):
    project, env = trained_copy
    store(project).delete_experiment("1")
    before = outputs(project)
    result, _ = run_stage_process(project, env, "train")
    assert_one_line(
        result,
        "MLflow experiment 'mnist' is deleted in",
        "mlflow experiments restore --experiment-id 1",
        "MLFLOW_EXPERIMENT_NAME",
    )
    assert outputs(project) == before
    assert store(project).get_experiment("1").lifecycle_stage == "deleted"


@pytest.mark.parametrize(
    "content", [b"not a database\n" * 100, "sqlite with other tables"], ids=["text", "other-sqlite"]
)
def test_store_that_is_not_an_mlflow_store(trained_copy, content):
    project, env = trained_copy
    database = project / "mlflow.db"
    database.unlink()
    if isinstance(content, bytes):
        database.write_bytes(content)
    else:
        with sqlite3.connect(database) as other:
            other.execute("CREATE TABLE invoices (id INTEGER)")
    store_before = database.read_bytes()
    before = outputs(project)
    result, _ = run_stage_process(project, env, "evaluate")
    assert_one_line(result, f"{database}", "not an MLflow store", "MLFLOW_TRACKING_URI")
    assert outputs(project) == before and database.read_bytes() == store_before


@pytest.mark.parametrize(
    "revision, fragment",
    [("0a8213491aaa", "was made by an older MLflow"), ("ffffffffffff", "was made by a newer MLflow")],
    ids=["older", "newer"],
)
def test_store_of_another_mlflow_version_is_not_migrated(trained_copy, revision, fragment):
    project, env = trained_copy
    database = project / "mlflow.db"
    with sqlite3.connect(database) as schema:
        schema.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    store_before = database.read_bytes()
    before = outputs(project)
    result, _ = run_stage_process(project, env, "evaluate")
    assert_one_line(result, fragment)
    assert outputs(project) == before and database.read_bytes() == store_before


def test_store_locked_by_another_writer(trained_copy):
    project, env = trained_copy
    before = outputs(project)
    lock = sqlite3.connect(project / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        result, seconds = run_stage_process(project, env, "evaluate")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    line = assert_one_line(result, "stayed locked by another writer (SQLite waited ")
    waited = float(re.search(r"SQLite waited ([0-9.]+) s\)", line)[1])
    assert 1 < waited < seconds < 120  # the measured wait, within the stage's own time
    assert outputs(project) == before
    assert store(project).search_runs(["1"])  # still opens


@pytest.fixture
def refusing_proxy():
    """A 'proxy' on 127.0.0.1 that answers 403 to every request."""

    class Forbidden(QuietHandler):
        def do_GET(self):
            self.send_error(403, "Forbidden by policy")

        do_POST = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_that_refuses_the_request(trained_copy, refusing_proxy):
    project, env = trained_copy
    before = outputs(project)
    result, seconds = run_stage_process(project, env, "evaluate", MLFLOW_TRACKING_URI=refusing_proxy)
    assert_one_line(result, f"MLflow tracking server {refusing_proxy} refused the request (HTTP 403")
    assert seconds < 60 and outputs(project) == before


def test_server_that_dies_during_training(trained_copy, tmp_path):
    """A real `mlflow server` on a loopback port, stopped once the first epoch is logged."""
    project, env = trained_copy
    params = project / "params.yaml"
    # Long enough to be stopped in the middle: many short epochs on the tiny data.
    params.write_text(params.read_text().replace("epochs: 1", "epochs: 200").replace("batch_size: 64", "batch_size: 4"))
    before = outputs(project)
    port = free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", server, seconds=180)
        training = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train"],
            cwd=project,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = mlflow.MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 180
        while not any(
            "loss" in tracked.data.metrics
            for tracked in client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
        ):
            assert training.poll() is None and time.monotonic() < deadline, "no epoch was logged"
            time.sleep(0.5)
    finally:
        stop(server)
    stopped = time.monotonic()
    stdout, stderr = training.communicate(timeout=180)
    result = subprocess.CompletedProcess(training.args, training.returncode, stdout, stderr)
    assert_one_line(result, f"MLflow tracking server {uri} stopped answering", "rerun `dvc repro`")
    assert time.monotonic() - stopped < 90
    assert outputs(project) == before  # no model that looks finished
