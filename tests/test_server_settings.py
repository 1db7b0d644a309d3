"""`make server` refuses unsafe settings in one line, before anything starts: no admin password, a
default or short one, a password file inside the repository, no authentication on a public address."""

import subprocess

import pytest

from tests.helpers import REPO, environment, error_lines, free_port


@pytest.mark.parametrize(
    "variables, message",
    [
        ({}, "authentication needs the admin's password: set MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "refusing to start with a default or short admin password"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "refusing to start with a default or short admin password"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(REPO / "README.md")}, "lies inside the repository"),
        ({"AUTH": "0", "HOST": "0.0.0.0"}, "AUTH=0 would show and hand every run, model and artifact to anyone"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-pa55word", "HOST": "0.0.0.0"}, "set SERVER_NAME"),
    ],
    ids=["no-password", "old-default", "short", "file-in-repo", "auth-off-public", "public-without-name"],
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
            *settings,
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
