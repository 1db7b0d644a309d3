"""Shared fixtures: MNIST served over HTTP on 127.0.0.1, and one tiny pipeline run to inspect."""

import functools
import http.server
import threading
from pathlib import Path

import pytest

from tests.helpers import QuietHandler, SECRET, copy_project, environment, make_project, mnist_source, run

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
