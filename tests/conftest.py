"""Shared fixtures: MNIST served over HTTP on 127.0.0.1, one tiny pipeline run to inspect, PostgreSQL."""

import functools
import shutil
import subprocess
import tempfile
import http.server
import threading
from pathlib import Path

import pytest

from tests.helpers import POSTGRES_BIN, QuietHandler, SECRET, copy_project, environment, free_port, make_project, mnist_source, run

@pytest.fixture(scope="session")
def serve_directory():
    """serve_directory(path) -> URL of an HTTP server on 127.0.0.1 serving that folder."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def mnist_url(serve_directory) -> str:
    return serve_directory(mnist_source())


@pytest.fixture
def trained_copy(pipeline_run, tmp_path):
    """(copy, env): a copy of the shared tiny pipeline run, its store included, for one test to change."""
    project, env, _ = pipeline_run
    return copy_project(project, tmp_path / "project"), env


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, mnist_url):
    """One tiny `dvc repro` of all five stages, shared by the tests that inspect its results."""
    project = make_project(tmp_path_factory.mktemp("pipeline"))
    env = environment(mnist_url, PIPELINE_TEST_SECRET=SECRET)
    result = run(project, ["dvc", "repro"], env)
    return project, env, result


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
