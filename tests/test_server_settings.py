"""`make server` refuses unsafe settings in one line, before anything starts: no admin password, a
default or short one, a password file inside the repository, no authentication on a public address
(nor options that would reopen it), a database password on the command line. And the login lock's
arithmetic (commands/tracking_auth.py), without a server."""

import signal
import subprocess
import sys

import pytest

from commands import tracking_auth
from commands.tracking_server import extra_options
from pipeline.errors import PipelineError
from tests.helpers import REPO, environment, error_lines, free_port, stop, wait_for

PASSWORD = {"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-pa55word"}


@pytest.mark.parametrize(
    "variables, message",
    [
        ({}, "authentication needs the admin's password: set MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "refusing to start with a default or short admin password"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "refusing to start with a default or short admin password"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(REPO / "README.md")}, "lies inside the repository"),
        ({"AUTH": "0", "HOST": "0.0.0.0"}, "AUTH=0 would show and hand every run, model and artifact to anyone"),
        ({**PASSWORD, "HOST": "0.0.0.0"}, "set SERVER_NAME"),
        ({"AUTH": "0", "UI_ARGS": "--host 0.0.0.0"}, "may carry only --workers, -w, --static-prefix"),
        ({"AUTH": "0", "UI_ARGS": "--workers 1 -h 0.0.0.0"}, "not '-h'"),
        ({"AUTH": "0", "UI_ARGS": '--uvicorn-opts "--host 0.0.0.0"'}, "not '--uvicorn-opts'"),
        ({**PASSWORD, "UI_ARGS": "--app-name=other --workers 1"}, "not '--app-name=other'"),
        ({**PASSWORD, "UI_ARGS": "--default-artifact-root file:///tmp"}, "not '--default-artifact-root'"),
        (
            {**PASSWORD, "BACKEND_STORE_URI": "postgresql://mlflow:s3cret@db:5432/mlflow"},
            "BACKEND_STORE_URI carries a password, which `ps` shows to every user of the machine; drop it "
            "from the URI and set PGPASSWORD",
        ),
        (
            {**PASSWORD, "AUTH_DATABASE_URI": "postgresql://db/auth?user=mlflow&password=s3cret"},
            "AUTH_DATABASE_URI carries a password",
        ),
    ],
    ids=[
        "no-password",
        "old-default",
        "short",
        "file-in-repo",
        "auth-off-public",
        "public-without-name",
        "auth-off-host-in-ui-args",
        "auth-off-short-host-in-ui-args",
        "auth-off-host-in-uvicorn-opts",
        "other-app",
        "client-artifact-root",
        "password-in-store-uri",
        "password-in-auth-database-uri",
    ],
)
def test_auth_make_server_refuses_unsafe_settings(mnist_url, tmp_path, variables, message):
    settings = [f"{key}={value}" for key, value in variables.items()]
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "server",
            f"PORT={free_port()}",
            f"BACKEND_STORE_URI=sqlite:///{tmp_path / 'store.db'}",
            f"ARTIFACTS_DESTINATION={tmp_path / 'artifacts'}",
            *settings,  # after the defaults: make takes the last of a variable's values
        ],
        cwd=REPO,
        env=environment(mnist_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    [line] = error_lines(result.stderr)
    assert line.startswith("error: server: ") and message in line, line
    assert not (tmp_path / "store.db").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("", []),
        ("--workers 1", ["--workers", "1"]),
        ("-w=2 --static-prefix /mlflow", ["-w=2", "--static-prefix", "/mlflow"]),
    ],
)
def test_auth_mlflow_args_that_leave_the_address_alone(extra, expected):
    assert extra_options(extra) == expected


@pytest.mark.parametrize(
    "extra", ["--host=0.0.0.0", "--port 80", "--workers --host 0.0.0.0", "--workers", "0.0.0.0", "--dev"]
)
def test_auth_mlflow_args_that_could_move_the_server_are_refused(extra):
    with pytest.raises(PipelineError, match="--mlflow-args"):
        extra_options(extra)


def test_auth_failed_logins_lock_a_user_name_for_doubling_times(monkeypatch):
    monkeypatch.setattr(tracking_auth, "_failures", type(tracking_auth._failures)(maxsize=10, ttl=3600))
    now = 1000.0
    for _ in range(tracking_auth.LOCK_AFTER - 1):
        tracking_auth.record_failure("mallory", now)
    assert tracking_auth.locked_for("mallory", now) == 0
    waits = []
    for _ in range(12):
        tracking_auth.record_failure("mallory", now)
        waits.append(tracking_auth.locked_for("mallory", now))
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, tracking_auth.LONGEST_LOCK, tracking_auth.LONGEST_LOCK]
    assert tracking_auth.locked_for("mallory", now + tracking_auth.LONGEST_LOCK) == 0
    assert tracking_auth.locked_for("alice", now) == 0, "one name's failures lock no other"
    tracking_auth.record_success("mallory")
    assert tracking_auth.locked_for("mallory", now) == 0


@pytest.mark.slow
def test_auth_settings_file_is_the_owners_and_goes_when_the_server_stops(mnist_url, tmp_path):
    """The basic-auth settings file: mode 0600 while the server runs, removed once a SIGTERM stops it."""
    port, temporary = free_port(), tmp_path / "tmp"
    temporary.mkdir()
    command = [sys.executable, "-m", "commands.tracking_server", "--port", str(port), "--mlflow-args", "--workers 1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'store.db'}", "--artifacts-destination", str(tmp_path)]
    command += ["--auth-database-uri", f"sqlite:///{tmp_path / 'auth.db'}"]
    env = environment(mnist_url, MLFLOW_AUTH_ADMIN_PASSWORD="a-long-enough-pa55word", TMPDIR=str(temporary))
    server = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, seconds=180)
        [settings] = temporary.glob("mlflow-auth-*.ini")
        assert settings.stat().st_mode & 0o777 == 0o600
        server.send_signal(signal.SIGTERM)  # to this process alone: it stops the server it started
        assert server.wait(timeout=60) == 0
        assert not settings.exists()
    finally:
        stop(server)
