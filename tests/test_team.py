"""Beyond one machine: `make server` (PostgreSQL store, S3 artifacts proxied by the server, MLflow's
authentication) and a DVC S3 remote, all real servers on 127.0.0.1: Debian's PostgreSQL and moto's S3.
`pytest -k "auth or permission"` selects the authentication tests."""

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import psycopg
import pytest
from mlflow.server import get_app_client

from tests.helpers import (
    NEEDS_POSTGRES,
    environment,
    error_lines,
    free_port,
    make_project,
    run,
    served_classes,
    stop,
    venv_for,
    wait_for,
)

BUCKET = "mnist-team"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
ADMIN_PASSWORD = "adm1n-pa55word-that-must-never-be-logged"
ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}

pytestmark = [pytest.mark.slow, NEEDS_POSTGRES]


@pytest.fixture(scope="module")
def s3():
    """moto's S3-compatible server on a free loopback port, with one bucket."""
    port = free_port()
    server = subprocess.Popen(
        [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint, server)
        boto3.client("s3", endpoint_url=endpoint, **client_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(server)


def client_credentials() -> dict:
    return {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, postgres, s3, mnist_url):
    """`make server` over PostgreSQL and S3, authentication on; yields (project, the admin's env).

    The project's data is prepared, so that any test can run a stage against the server."""
    scratch = tmp_path_factory.mktemp("team")
    project = make_project(scratch / "project", shrink_conf=True)
    venv_for(project)
    port = free_port()
    env = environment(mnist_url, MLFLOW_S3_ENDPOINT_URL=s3, **S3_ENV)
    started = time.monotonic()
    server = subprocess.Popen(
        [
            "make",
            "server",
            f"PORT={port}",
            f"BACKEND_STORE_URI={postgres}",
            f"ARTIFACTS_DESTINATION=s3://{BUCKET}/mlflow",
            f"AUTH_DATABASE_URI=sqlite:///{scratch / 'auth.db'}",
            "UI_ARGS=--workers 1",
        ],
        cwd=project,
        env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, seconds=180)
        print(f"make server with authentication answered after {time.monotonic() - started:.1f} s")
        run(project, ["dvc", "repro", "preprocess"], env)
        yield project, {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", **ADMIN}
    finally:
        stop(server)


def bucket_keys(endpoint: str, prefix: str = "") -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, **client_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_auth_pipeline_and_sweep_against_the_team_server(team_server, postgres, s3):
    """The right credentials log complete runs; none of them lands anywhere the pipeline writes."""
    project, env = team_server
    repro = run(project, ["dvc", "repro"], env)
    sweep = run(project, [sys.executable, "-m", "commands.sweep", "lr_x10"], env)

    with psycopg.connect(postgres) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name, status FROM runs ORDER BY start_time")
        runs = cursor.fetchall()
    assert len(runs) == 2 and {status for _, status in runs} == {"FINISHED"}
    assert runs[1][0] == "lr_x10-seed0"
    assert not (project / "mlflow.db").exists(), "nothing may fall back to the local store"

    keys = bucket_keys(s3, "mlflow/")
    assert sum(key.endswith("/MLmodel") for key in keys) == 2, "both models, in the bucket"
    assert sum(key.endswith("error_analysis/misclassified.png") for key in keys) == 2

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    logged = []
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ADMIN.items():
            patch.setenv(key, value)
        for tracked in client.search_runs([client.get_experiment_by_name("mnist").experiment_id]):
            logged += [*tracked.data.params.values(), *tracked.data.tags.values(), json.dumps(tracked.data.metrics)]
            logged.append(
                Path(client.download_artifacts(tracked.info.run_id, "environment/requirements.txt")).read_text()
            )
    written = [(project / name).read_text() for name in ("params.yaml", "dvc.lock", ".dvc/config")]
    for text in [*logged, *written, repro.stdout, repro.stderr, sweep.stdout, sweep.stderr]:
        assert ADMIN_PASSWORD not in text


def test_auth_anonymous_requests_get_401(team_server):
    _, env = team_server
    for path in ("/api/2.0/mlflow/experiments/search?max_results=5", "/api/2.0/mlflow/registered-models/search"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{env['MLFLOW_TRACKING_URI']}{path}", timeout=10)
        assert refused.value.code == 401


@pytest.mark.parametrize(
    "credentials, message",
    [
        (
            {"MLFLOW_TRACKING_PASSWORD": "not-the-password"},
            "rejected the login of MLFLOW_TRACKING_USERNAME=admin; check MLFLOW_TRACKING_PASSWORD",
        ),
        (
            {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""},
            "requires a login; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
    ],
    ids=["wrong-password", "no-login"],
)
def test_auth_bad_login_is_one_line_before_any_training(team_server, credentials, message):
    project, env = team_server
    started = time.monotonic()
    result = run(project, [sys.executable, "-m", "pipeline.train"], {**env, **credentials}, check=False)
    assert result.returncode == 1 and time.monotonic() - started < 60
    [line] = error_lines(result.stderr)
    assert message in line and "Traceback" not in result.stderr
    assert "Epoch 1" not in result.stdout


def test_permission_read_only_user_can_search_runs_but_not_log_one(team_server, monkeypatch):
    project, env = team_server
    uri = env["MLFLOW_TRACKING_URI"]
    for key, value in ADMIN.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("team-permissions")  # its own: the other tests count mnist's runs
    client.set_terminated(client.create_run(experiment_id, run_name="by-the-admin").info.run_id)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user(username="reader", password="reader-pa55word-long")
    auth.grant_user_permission("reader", "experiment", experiment_id, "READ")

    reader = {"MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "reader-pa55word-long"}
    for key, value in reader.items():
        monkeypatch.setenv(key, value)
    assert "by-the-admin" in {
        tracked.info.run_name for tracked in mlflow.MlflowClient(uri).search_runs([experiment_id])
    }
    result = run(
        project,
        [sys.executable, "-m", "pipeline.train"],
        {**env, **reader, "MLFLOW_EXPERIMENT_NAME": "team-permissions"},
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    [line] = error_lines(result.stderr)
    assert "refused the request (HTTP 403): MLFLOW_TRACKING_USERNAME=reader lacks the permission" in line
    assert "Traceback" not in result.stderr


def test_dvc_s3_remote_push_drop_pull(team_server, s3):
    project, env = team_server
    run(project, ["dvc", "remote", "add", "--default", "team", f"s3://{BUCKET}/dvc"], env)
    run(project, ["dvc", "remote", "modify", "--local", "team", "endpointurl", s3], env)
    run(project, ["dvc", "repro"], env)
    run(project, ["dvc", "push"], env)
    assert bucket_keys(s3, "dvc/")

    shutil.rmtree(project / ".dvc" / "cache")
    for output in ("data", "models", "reports/error_analysis"):
        shutil.rmtree(project / output)
    run(project, ["dvc", "pull"], env)
    again = run(project, ["dvc", "repro"], env)
    assert "Running stage" not in again.stdout
    assert (project / "models/model.keras").exists()


def test_auth_promote_and_serve_from_the_team_server(team_server):
    """`make promote` and `make serve` against the server: the registry and the proxied artifacts, logged in."""
    project, env = team_server
    run(project, ["dvc", "repro"], env)  # nothing to do when another test trained already
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    promoted = run(project, ["make", "--no-print-directory", "promote", f"RUN={run_id}"], env)
    assert "alias @champion" in promoted.stderr
    served = served_classes(project, env, 10, MODEL="models:/mnist-classifier@champion")
    expected = np.load(project / "data/predictions/test_probabilities.npy")[:10].argmax(axis=1)
    assert list(served) == list(expected)
