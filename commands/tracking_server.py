"""`make server`: the team's MLflow server, with authentication on by default.

A SQLAlchemy backend store (PostgreSQL for a team), artifacts proxied to S3 (clients need no S3
credentials), MLflow's basic-auth app (users; READ, EDIT or MANAGE per experiment and registered
model; nobody sees anything unless granted), and host and origin checks set from the name clients
use (against DNS rebinding and cross-site requests). Nothing here writes a password to disk: the
admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD or from a file outside the repository, and a
missing, default or short one refuses to start. AUTH=0 turns authentication off, and is refused
unless the server listens on loopback only.
"""

import argparse
import os
import secrets
import shlex
import sys
import tempfile
from pathlib import Path

from pipeline import project_root
from pipeline.errors import PipelineError, guard

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow's default admin password until 3.x, and the ones people try first.
REFUSED_PASSWORDS = {"password1234", "password", "admin", "changeme", "mlflow"}
MIN_PASSWORD_LENGTH = 12


def admin_password() -> str:
    path = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD_FILE")
    if path:
        file = Path(path).expanduser().resolve()
        if file.is_relative_to(project_root().resolve()):
            raise PipelineError(
                f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE={path} lies inside the repository, one `git add` "
                "from being committed; keep it outside (e.g. ~/.config/mlflow/admin-password)"
            )
        password = file.read_text(encoding="utf-8").strip()
    else:
        password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise PipelineError(
            "authentication needs the admin's password: set MLFLOW_AUTH_ADMIN_PASSWORD, or "
            "MLFLOW_AUTH_ADMIN_PASSWORD_FILE=<a file outside the repository> (or AUTH=0 on loopback)"
        )
    if password.lower() in REFUSED_PASSWORDS or len(password) < MIN_PASSWORD_LENGTH:
        raise PipelineError(
            "refusing to start with a default or short admin password; choose one of at least "
            f"{MIN_PASSWORD_LENGTH} characters that is not a default"
        )
    return password


def server(
    backend: str, artifacts: str, host: str, port: int, auth: bool, server_name: str, auth_database: str, extra: str
) -> None:
    if not backend or not artifacts:
        raise PipelineError("set BACKEND_STORE_URI=postgresql://... and ARTIFACTS_DESTINATION=s3://bucket/path")
    loopback = host in LOOPBACK
    if not auth and not loopback:
        raise PipelineError(
            f"AUTH=0 would show and hand every run, model and artifact to anyone who reaches "
            f"{host}:{port}; refused: keep authentication on, or listen on HOST=127.0.0.1"
        )
    if not loopback and not server_name:
        raise PipelineError(
            f"HOST={host}: set SERVER_NAME to the host name clients use (e.g. mlflow.internal); "
            "the server accepts requests addressed to that name only"
        )
    name = server_name or host
    hosts = dict.fromkeys([name, f"{name}:{port}", "localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}"])
    origins = dict.fromkeys(
        [f"http://{name}:{port}", f"https://{name}", f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
    )
    command = [
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--allowed-hosts",
        ",".join(hosts),
        "--cors-allowed-origins",
        ",".join(origins),
        *shlex.split(extra),
    ]
    environment = dict(os.environ)
    if auth:
        environment["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password()
        environment["MLFLOW_AUTH_CONFIG_PATH"] = auth_config(auth_database)
        # Signs the UI's sessions and CSRF tokens; a new one per start logs browsers out, nothing more.
        environment.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        command += ["--app-name", "basic-auth"]
    print(
        f"server: http://{name}:{port}, authentication {'on' if auth else 'OFF (loopback only)'}; "
        f"store {backend.split('@')[-1]}, artifacts {artifacts}",
        file=sys.stderr,
    )
    os.execvpe(command[0], command, environment)


def auth_config(database: str) -> str:
    """MLflow's basic-auth settings (no secret in them), in a file outside the repository."""
    if database.startswith("sqlite:///"):
        Path(database.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    username = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    descriptor, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(descriptor, "w") as config:
        config.write(
            "[mlflow]\n"
            "# Nobody reads or writes anything until granted (docs/team.md).\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {database}\n"
            f"admin_username = {username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri", default="", help="postgresql://user@host:port/db (required)")
    parser.add_argument("--artifacts-destination", default="", help="s3://bucket/path (required)")
    parser.add_argument("--server-name", default="", help="the name clients use, when --host is not loopback")
    parser.add_argument(
        "--auth-database-uri",
        default=f"sqlite:///{Path.home() / '.mlflow' / 'mnist-basic-auth.db'}",
        help="users and permissions (default: %(default)s)",
    )
    parser.add_argument("--no-auth", action="store_true", help="authentication off; refused unless --host is loopback")
    parser.add_argument("--mlflow-args", default="", help="more options for `mlflow server`, as one string")
    arguments = parser.parse_args()
    guard(
        "server",
        server,
        arguments.backend_store_uri,
        arguments.artifacts_destination,
        arguments.host,
        arguments.port,
        not arguments.no_auth,
        arguments.server_name,
        arguments.auth_database_uri,
        arguments.mlflow_args,
    )


if __name__ == "__main__":
    main()
