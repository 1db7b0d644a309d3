"""`make server`: the team's MLflow server, with authentication on by default.

A SQLAlchemy backend store (PostgreSQL for a team), artifacts proxied to S3 (clients need no S3
credentials), MLflow's basic-auth app (users; READ, EDIT or MANAGE per experiment and registered
model; nobody sees anything unless granted), and host and origin checks set from the name clients
use (against DNS rebinding and cross-site requests), and the rules of commands/tracking_auth.py
on top (logins, artifact locations). No password on a command line (where `ps` shows it) nor in a
file it writes: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD or from a file outside the repository (a missing,
default or short one refuses to start), the databases' from PGPASSWORD or libpq's password file; a
database URI that carries one is refused. AUTH=0 turns authentication off, and is refused unless
the server listens on loopback only; no option of --mlflow-args can change where it listens.
"""

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

from pipeline import project_root
from pipeline.errors import ArgumentParser, PipelineError, guard
from pipeline.tracking import JOB_RUNNER_SWITCH

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow's default admin password until 3.x, and the ones people try first.
REFUSED_PASSWORDS = {"password1234", "password", "admin", "changeme", "mlflow"}
MIN_PASSWORD_LENGTH = 12
# What --mlflow-args may carry: options of `mlflow server` that change neither where it listens nor
# who gets in nor where artifacts go (--host, --uvicorn-opts, --app-name, --default-artifact-root,
# --disable-security-middleware, --env-file and the rest would).
EXTRA_OPTIONS = ("--workers", "-w", "--static-prefix", "--expose-prometheus")


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


def extra_options(extra: str) -> list[str]:
    """--mlflow-args as arguments, each option one of EXTRA_OPTIONS, with its value."""
    arguments = shlex.split(extra)
    position = 0
    while position < len(arguments):
        option, equals, _ = arguments[position].partition("=")
        if option not in EXTRA_OPTIONS:
            raise PipelineError(
                f"--mlflow-args (UI_ARGS) may carry only {', '.join(EXTRA_OPTIONS)}, not {arguments[position]!r}: "
                "the address, authentication and artifact store are set by HOST, PORT, AUTH, SERVER_NAME "
                "and ARTIFACTS_DESTINATION, and checked together"
            )
        position += 1 if equals else 2
        if not equals and (position > len(arguments) or arguments[position - 1].startswith("-")):
            raise PipelineError(f"--mlflow-args (UI_ARGS): {option} needs its value (e.g. --workers 2)")
    return arguments


def without_password(name: str, uri: str) -> str:
    """uri, refused when it carries a password: `ps` shows a command line to every user of the machine."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is not None or "password" in urllib.parse.parse_qs(parts.query):
        raise PipelineError(
            f"{name} carries a password, which `ps` shows to every user of the machine; drop it from the "
            "URI and set PGPASSWORD=<password> in the server's environment (or put it in ~/.pgpass, "
            "mode 0600: https://www.postgresql.org/docs/current/libpq-pgpass.html)"
        )
    return uri


def server(
    backend: str, artifacts: str, host: str, port: int, auth: bool, server_name: str, auth_database: str, extra: str
) -> None:
    if not backend or not artifacts:
        raise PipelineError("set BACKEND_STORE_URI=postgresql://... and ARTIFACTS_DESTINATION=s3://bucket/path")
    without_password("BACKEND_STORE_URI", backend)
    extras = extra_options(extra)
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
        *extras,
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
    ]
    environment = dict(os.environ)
    environment.setdefault(*JOB_RUNNER_SWITCH)
    config = None
    if auth:
        environment["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password()
        config = auth_config(without_password("AUTH_DATABASE_URI", auth_database))
        environment["MLFLOW_AUTH_CONFIG_PATH"] = config
        # The server's workers import commands.tracking_auth, named in that file, from this checkout.
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_root()), os.environ.get("PYTHONPATH")]))
        # Signs the UI's sessions and CSRF tokens; a new one per start logs browsers out, nothing more.
        environment.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        command += ["--app-name", "basic-auth"]
    print(
        f"server: http://{name}:{port}, authentication {'on' if auth else 'OFF (loopback only)'}; "
        f"store {backend.split('@')[-1]}, artifacts {artifacts}",
        file=sys.stderr,
    )
    try:
        returncode = run_until_stopped(command, environment)
    finally:
        if config:
            Path(config).unlink(missing_ok=True)
    raise SystemExit(returncode if returncode >= 0 else 128 - returncode)


def run_until_stopped(command: list[str], environment: dict[str, str]) -> int:
    """Runs command as a child, passing on the signals that stop it, so that this process outlives
    it and removes what it wrote for it (an exec would leave the auth settings behind)."""
    child = subprocess.Popen(command, env=environment)
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda number, _: child.send_signal(number))
    return child.wait()


def auth_config(database: str) -> str:
    """MLflow's basic-auth settings, in a file only its owner reads (the database URI says where the
    users are; its password, if any, comes from the environment), removed when the server stops."""
    if database.startswith("sqlite:///"):
        Path(database.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    username = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    descriptor, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")  # mode 0600
    with os.fdopen(descriptor, "w") as config:
        config.write(
            "[mlflow]\n"
            "# Nobody reads or writes anything until granted (docs/team.md).\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {database}\n"
            f"admin_username = {username}\n"
            "authorization_function = commands.tracking_auth:authenticate\n"
        )
    return path


def main() -> None:
    parser = ArgumentParser(command="server", description=__doc__.splitlines()[0])
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
