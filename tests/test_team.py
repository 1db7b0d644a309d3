"""Beyond one machine: `make server` (PostgreSQL store, S3 artifacts proxied by the server, MLflow's
authentication) and a DVC S3 remote, all real servers on 127.0.0.1: Debian's PostgreSQL and moto's S3.
`pytest -k "auth or permission"` selects the authentication tests, among them the attacks of issue 39:
one user reading or writing another's artifacts through model version sources, experiment artifact
locations or trace tags; user names told apart by the time of a refusal, guessed without limit, or
listed; a password on a command line or left in a file."""

import json
import shutil
import statistics
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
import requests
from mlflow.server import get_app_client

from commands import tracking_auth
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
# The store's role logs in with this password, from PGPASSWORD: as a team's database would.
DB_PASSWORD = "db-pa55word-that-must-never-show"
USERS = {"alice": "alice-pa55word-long", "bob": "bob-pa55word-long", "carol": "carol-pa55word-long"}

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


def password_protected(postgres: str) -> str:
    """The URI of postgres's database as a role that must log in with DB_PASSWORD (scram-sha-256), with
    no password in it; the fixture's own superuser keeps logging in without one."""
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE team LOGIN PASSWORD '{DB_PASSWORD}'")
        connection.execute("ALTER DATABASE mlflow OWNER TO team")
        hba = Path(connection.execute("SHOW hba_file").fetchone()[0])
        hba.write_text(f"host mlflow team 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        connection.execute("SELECT pg_reload_conf()")
    return postgres.replace("//postgres@", "//team@")


def server_tmp(tmp_path_factory) -> Path:
    """The team server's TMPDIR, where its authentication settings file lies while it runs."""
    return tmp_path_factory.getbasetemp() / "team-server-tmp"


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, postgres, s3, mnist_url):
    """`make server` over PostgreSQL (password from PGPASSWORD) and S3, authentication on; yields
    (project, the admin's env).

    The project's data is prepared, so that any test can run a stage against the server."""
    scratch = tmp_path_factory.mktemp("team")
    server_tmp(tmp_path_factory).mkdir()
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
            f"BACKEND_STORE_URI={password_protected(postgres)}",
            f"ARTIFACTS_DESTINATION=s3://{BUCKET}/mlflow",
            f"AUTH_DATABASE_URI=sqlite:///{scratch / 'auth.db'}",
            "UI_ARGS=--workers 1",  # one worker: one count of failed logins, as the lock test expects
        ],
        cwd=project,
        env={
            **env,
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "PGPASSWORD": DB_PASSWORD,
            "TMPDIR": str(server_tmp(tmp_path_factory)),
        },
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


class Api:
    """The server's REST API as one user (or with a raw Authorization header), answers unparsed."""

    def __init__(self, url: str, username: str = "", password: str = "", authorization: str = ""):
        self.url, self.session = url, requests.Session()
        if authorization:
            self.session.headers["Authorization"] = authorization
        elif username:
            self.session.auth = (username, password)

    def __call__(self, method: str, path: str, **arguments) -> requests.Response:
        return self.session.request(method, f"{self.url}/api/2.0/{path}", timeout=60, **arguments)

    def ok(self, method: str, path: str, **arguments) -> dict:
        response = self(method, path, **arguments)
        assert response.status_code == 200, response.text
        return response.json() if response.content else {}

    def experiment_with_file(self, name: str, content: str) -> tuple[str, str]:
        """(experiment id, run id) of a new experiment of this user's, with one run and its file secret.txt."""
        experiment_id = self.ok("POST", "mlflow/experiments/create", json={"name": name})["experiment_id"]
        run = self.ok("POST", "mlflow/runs/create", json={"experiment_id": experiment_id})["run"]["info"]
        path = run["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
        self.ok("PUT", f"mlflow-artifacts/artifacts/{path}/secret.txt", data=content.encode())
        return experiment_id, run["run_id"]


@pytest.fixture(scope="module")
def users(team_server):
    """{name: Api} for the admin and USERS, created as the README says; alice has an experiment with a file."""
    _, env = team_server
    url = env["MLFLOW_TRACKING_URI"]
    apis = {"admin": Api(url, "admin", ADMIN_PASSWORD)}
    for name, password in USERS.items():
        apis["admin"].ok("POST", "mlflow/users/create", json={"username": name, "password": password})
        apis[name] = Api(url, name, password)
    return apis


def test_permission_model_version_sources_stay_within_what_the_user_reads(team_server, users, s3):
    """Bob cannot register alice's (or any bucket's) files as a version of his own model, by any source."""
    _, env = team_server
    alice, bob = users["alice"], users["bob"]
    experiment, run = alice.experiment_with_file("alice-private", "alice's secret")
    assert bob("GET", "mlflow/runs/get", params={"run_id": run}).status_code == 403
    boto3.client("s3", endpoint_url=s3, **client_credentials()).create_bucket(Bucket="elsewhere")

    bob.ok("POST", "mlflow/registered-models/create", json={"name": "bobs-model"})
    alices = f"{experiment}/{run}/artifacts"
    for source, run_id in [
        (f"s3://{BUCKET}/mlflow/{alices}", None),
        (f"s3://{BUCKET}/mlflow/{alices}", run),
        ("s3://elsewhere/", None),
        ("file:///etc", None),
        (f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow-artifacts/artifacts/{alices}", run),
        (f"mlflow-artifacts:/{alices}", run),
        (f"runs:/{run}/secret.txt", run),
        (f"S3://{BUCKET}/mlflow/{alices}", None),
    ]:
        request = {"name": "bobs-model", "source": source, **({"run_id": run_id} if run_id else {})}
        refused = bob("POST", "mlflow/model-versions/create", json=request)
        assert refused.status_code == 403, (source, refused.text)
    ajax = bob.session.post(
        f"{bob.url}/ajax-api/2.0/mlflow/model-versions/create", json={"name": "bobs-model", "source": "s3://elsewhere/"}
    )
    assert ajax.status_code == 403, "the UI's route too"
    for source in ("s3://elsewhere/", "file:///etc"):
        refused = bob("POST", "mlflow/model-versions/create", json={"name": "bobs-model", "source": source})
        assert f"model version source '{source}' refused: register runs:/<run id>/<path>" in refused.json()["message"]
    assert bob.ok("GET", "mlflow/model-versions/search", params={"filter": "name='bobs-model'"}) == {}

    experiment, own = bob.experiment_with_file("bob-own", "bob's file")
    source = {"source": f"mlflow-artifacts:/{experiment}/{own}/artifacts", "run_id": own}
    version = bob.ok("POST", "mlflow/model-versions/create", json={"name": "bobs-model", **source})["model_version"]
    artifact = bob.session.get(
        f"{bob.url}/model-versions/get-artifact",
        params={"name": "bobs-model", "version": version["version"], "path": "secret.txt"},
        timeout=60,
    )
    assert artifact.status_code == 200 and artifact.text == "bob's file"


def test_permission_artifacts_go_where_the_server_puts_them(team_server, users, s3):
    """No client-chosen experiment artifact location (other folders, buckets, someone's run), for the
    admin neither; no client-set trace artifact location; bob's uploads land under his experiment."""
    alice, bob, admin = users["alice"], users["bob"], users["admin"]
    experiment, run = alice.experiment_with_file("alice-targeted", "alice's")
    alices = f"{experiment}/{run}/artifacts"
    for user, location in [
        (bob, "file:///tmp/bob-writes-here"),
        (bob, f"s3://{BUCKET}/mlflow/{alices}"),
        (bob, f"mlflow-artifacts:/{alices}"),
        (bob, "s3://elsewhere/bob"),
        (admin, "file:///tmp/admin-writes-here"),
    ]:
        name = f"located-{len(location)}-{user.session.auth[0]}"
        refused = user("POST", "mlflow/experiments/create", json={"name": name, "artifact_location": location})
        assert refused.status_code == 403, refused.text
        assert "this server keeps every experiment's artifacts under its own destination" in refused.json()["message"]
        assert user("GET", "mlflow/experiments/get-by-name", params={"experiment_name": name}).status_code == 404
    assert not Path("/tmp/bob-writes-here").exists()

    tag = {"key": "mlflow.artifactLocation", "value": f"s3://{BUCKET}/mlflow/{experiment}/traces/tr-1/artifacts"}
    for method, path, body in [
        ("PATCH", "mlflow/traces/tr-0123456789abcdef/tags", tag),
        ("PATCH", "mlflow/traces/0123456789abcdef", {"timestamp_ms": 1, "status": "OK", "tags": [tag]}),  # end-trace
    ]:
        tagged = bob(method, path, json=body)
        assert tagged.status_code == 403 and "is the server's to set" in tagged.json()["message"], tagged.text

    own_experiment, own_run = bob.experiment_with_file("bob-uploads", "bob's")
    location = bob.ok("GET", "mlflow/experiments/get", params={"experiment_id": own_experiment})["experiment"]
    assert location["artifact_location"] == f"mlflow-artifacts:/{own_experiment}"
    assert f"mlflow/{own_experiment}/{own_run}/artifacts/secret.txt" in bucket_keys(s3, f"mlflow/{own_experiment}/")
    assert bucket_keys(s3, f"mlflow/{alices}/") == [f"mlflow/{alices}/secret.txt"], "nothing of bob's among hers"


def test_auth_a_refused_login_takes_as_long_for_unknown_user_names(users):
    """The time of a refusal does not tell whether the user name exists (fewer tries than lock it)."""
    url = users["admin"].url

    def refusal_seconds(username: str) -> float:
        api, times = Api(url, username, "wrong-guess"), []
        for _ in range(tracking_auth.LOCK_AFTER - 1):
            started = time.monotonic()
            assert api("GET", "mlflow/experiments/search", params={"max_results": 1}).status_code == 401
            times.append(time.monotonic() - started)
        return statistics.median(times)

    existing, unknown = refusal_seconds("carol"), refusal_seconds("nobody-of-that-name")
    print(f"median refusal: existing user {existing * 1000:.0f} ms, unknown user {unknown * 1000:.0f} ms")
    assert 0.5 < unknown / existing < 2


def test_auth_repeated_failed_logins_lock_the_user_name(users):
    url = users["admin"].url
    for username, password in [("bob", USERS["bob"]), ("made-up-name", "anything-at-all")]:
        for _ in range(tracking_auth.LOCK_AFTER):
            assert Api(url, username, "wrong-guess")("GET", "mlflow/experiments/search").status_code == 401
        locked = Api(url, username, password)("GET", "mlflow/experiments/search")
        assert locked.status_code == 429, locked.text
        assert locked.headers["Retry-After"] == "1" and "too many failed logins" in locked.json()["message"]
    time.sleep(1.1)
    assert users["bob"]("GET", "mlflow/experiments/search", params={"max_results": 1}).status_code == 200, (
        "the lock ends, the right password works"
    )


def test_auth_only_admins_list_users(users):
    refused = users["bob"]("GET", "mlflow/users/list")
    assert refused.status_code == 403 and refused.json()["message"] == "only admins list users"
    listed = {user["username"] for user in users["admin"].ok("GET", "mlflow/users/list")["users"]}
    assert {"admin", *USERS} <= listed


@pytest.mark.parametrize(
    "authorization",
    [
        'Digest username="admin", realm="mlflow", nonce="x", uri="/", response="y"',
        "Bearer some-token",
        "Basic !!!not-base64!!!",
        "Basic YWRtaW4=",  # "admin", no colon, no password
        "Basic",
    ],
    ids=["digest", "bearer", "bad-base64", "no-password", "empty"],
)
def test_auth_malformed_authorization_gets_401(users, authorization):
    api = Api(users["admin"].url, authorization=authorization)
    assert api("GET", "mlflow/experiments/search", params={"max_results": 1}).status_code == 401
    assert api("GET", "mlflow-artifacts/artifacts/0/x/artifacts/y").status_code == 401  # served by FastAPI


def test_auth_no_password_on_a_command_line_or_in_a_file_others_read(team_server, tmp_path_factory):
    """`ps` shows neither the admin's nor the database's password; the settings file is its owner's."""
    commands = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    assert "mlflow server" in commands and "uvicorn" in commands
    assert ADMIN_PASSWORD not in commands and DB_PASSWORD not in commands
    [settings] = server_tmp(tmp_path_factory).glob("mlflow-auth-*.ini")
    assert settings.stat().st_mode & 0o777 == 0o600
    text = settings.read_text()
    assert "commands.tracking_auth:authenticate" in text
    assert ADMIN_PASSWORD not in text and DB_PASSWORD not in text
