"""Beyond one machine: `make server` (PostgreSQL store, S3 artifacts proxied by the server) and a
DVC S3 remote, all real servers on 127.0.0.1: Debian's PostgreSQL and moto's S3."""

import glob
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import psycopg
import pytest

from tests.helpers import environment, free_port, make_project, run, stop, venv_for, wait_for

POSTGRES_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
BUCKET = "mnist-team"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not POSTGRES_BIN or not shutil.which("runuser"),
                                                  reason="Debian's postgresql is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, run as the postgres user."""
    binaries = Path(POSTGRES_BIN[-1])
    directory = Path(tempfile.mkdtemp(prefix="mnist-postgres-"))
    shutil.chown(directory, "postgres")
    port = free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, binaries / "initdb", "-D", directory / "data", "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, binaries / "pg_ctl", "-D", directory / "data", "-l", directory / "log", "-w",
                    "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*as_postgres, binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, binaries / "pg_ctl", "-D", directory / "data", "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def s3():
    """moto's S3-compatible server on a free loopback port, with one bucket."""
    port = free_port()
    server = subprocess.Popen([Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
    """`make server` over PostgreSQL and S3; yields (project, env with MLFLOW_TRACKING_URI)."""
    project = make_project(tmp_path_factory.mktemp("team"), shrink_conf=True)
    venv_for(project)
    port = free_port()
    env = environment(mnist_url, MLFLOW_S3_ENDPOINT_URL=s3, **S3_ENV)
    server = subprocess.Popen(
        ["make", "server", f"PORT={port}", f"BACKEND_STORE_URI={postgres}",
         f"ARTIFACTS_DESTINATION=s3://{BUCKET}/mlflow", "UI_ARGS=--workers 1"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, seconds=180)
        yield project, {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    finally:
        stop(server)


def bucket_keys(endpoint: str, prefix: str = "") -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, **client_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_pipeline_and_sweep_against_the_team_server(team_server, postgres, s3):
    project, env = team_server
    run(project, ["dvc", "repro"], env)
    run(project, [sys.executable, "-m", "pipeline.sweep", "lr_x10"], env)

    with psycopg.connect(postgres) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name, status FROM runs ORDER BY start_time")
        runs = cursor.fetchall()
    assert len(runs) == 2 and {status for _, status in runs} == {"FINISHED"}
    assert runs[1][0] == "lr_x10-seed0"
    assert not (project / "mlflow.db").exists(), "nothing may fall back to the local store"

    keys = bucket_keys(s3, "mlflow/")
    assert sum(key.endswith("/MLmodel") for key in keys) == 2, "both models, in the bucket"
    assert sum(key.endswith("error_analysis/misclassified.png") for key in keys) == 2


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
