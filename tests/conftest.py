"""Shared fixtures: MNIST served over HTTP on 127.0.0.1, one tiny pipeline run to inspect, PostgreSQL."""

import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import (
    POSTGRES_BIN,
    SECRET,
    QuietHandler,
    copy_project,
    environment,
    free_port,
    make_project,
    mnist_source,
    run,
)


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
def pipeline_run(tmp_path_factory, worker_id, mnist_url):
    """One tiny `dvc repro` of all five stages, shared by the tests that inspect its results.

    Built once for the whole session, whichever test worker asks first; the others wait for it
    (the xdist recipe: https://pytest-xdist.readthedocs.io/en/stable/how-to.html). Tests that run
    anything in it take their own copy (trained_copy): two workers never write into it at once.
    """
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # under xdist: the session's folder, above the workers' own
        shared = shared.parent
    project, output = shared / "pipeline", shared / "pipeline-output.json"
    env = environment(mnist_url, PIPELINE_TEST_SECRET=SECRET)
    with FileLock(shared / "pipeline.lock"):
        if not output.exists():
            shutil.rmtree(project, ignore_errors=True)  # a worker that failed halfway
            make_project(project)
            result = run(project, ["dvc", "repro"], env)
            output.write_text(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))
    return project, env, subprocess.CompletedProcess(["dvc", "repro"], 0, **json.loads(output.read_text()))


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, run as the postgres user."""
    binaries = Path(POSTGRES_BIN[-1])
    directory = Path(tempfile.mkdtemp(prefix="mnist-postgres-"))
    shutil.chown(directory, "postgres")
    port = free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, binaries / "initdb", "-D", directory / "data", "--auth=trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_postgres,
            binaries / "pg_ctl",
            "-D",
            directory / "data",
            "-l",
            directory / "log",
            "-w",
            "-o",
            f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [*as_postgres, binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_postgres, binaries / "pg_ctl", "-D", directory / "data", "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(directory, ignore_errors=True)
