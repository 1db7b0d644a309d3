"""Test helpers: throwaway copies of the project, its commands, and the servers' plumbing.

Each test project is a real git + DVC repository made from this checkout, with params.yaml
composed from the real conf/ and shrunk (a few hundred images, one epoch).
"""

import functools
import glob
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import write_params
from pipeline.tracking import UI_STOP_SECONDS

REPO = Path(__file__).resolve().parent.parent
POSTGRES_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
NEEDS_POSTGRES = pytest.mark.skipif(
    not POSTGRES_BIN or not shutil.which("runuser"), reason="Debian's postgresql is not installed (.ci/run installs it)"
)
TINY = ["data.limit=300", "train.epochs=1"]
CHROMIUM = shutil.which("chromium")
SECRET = "s3cr3t-token-that-must-never-be-logged"


@functools.cache
def mnist_source() -> Path:
    """The folder with the four MNIST files: MNIST_MIRROR when it is a folder, else ../shared."""
    candidates = [os.environ.get("MNIST_MIRROR", ""), REPO.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.fail(
        "MNIST files not found: set MNIST_MIRROR to a folder holding the four "
        "*-ubyte.gz files (e.g. ../shared/data/mnist)"
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *arguments):
        pass


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


# The variables by which MLflow knows it runs under CI or pytest and keeps quiet
# (_is_ci_env_or_testing in mlflow/telemetry/utils.py): a user's shell has none of them.
CI_MARKERS = {
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
}


def make_project(destination: Path, overrides=TINY, shrink_conf: bool = False) -> Path:
    """Copies the project into `destination`, composes a shrunk params.yaml, commits it all.

    shrink_conf also writes the shrink into conf/config.yaml, for what composes conf/ itself
    (`dvc exp run`, the sweep and the comparison).
    """
    for name in project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    if shrink_conf:
        conf = OmegaConf.load(destination / "conf/config.yaml")
        for override in overrides:
            key, value = override.split("=", 1)
            OmegaConf.update(conf, key, yaml.safe_load(value))
        (destination / "conf/config.yaml").write_text(OmegaConf.to_yaml(conf))
    write_params(list(overrides), conf_dir=destination / "conf", params_file=destination / "params.yaml")
    git(destination, "init", "-q", "-b", "main")
    git(destination, "add", "-A")
    git(destination, "commit", "-q", "-m", "test project")
    return destination


def copy_project(project: Path, destination: Path) -> Path:
    """A copy of a test project (git history, DVC cache and MLflow store included) for one test to change.

    The store still names the original's artifact folder: runs the copy logs put their artifacts there.
    """
    shutil.copytree(project, destination, symlinks=True)
    return destination


def venv_for(project: Path) -> None:
    """Gives a project copy this interpreter's venv as its .venv, so its `make` targets run as-is."""
    if not (project / ".venv").exists():
        (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    # Older than .venv/.installed whatever the copy's time: make must not rebuild the shared venv.
    os.utime(project / "requirements.lock", (0, 0))


def git(project: Path, *arguments: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *arguments],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# make in a project copy: it has no .venv of its own, the tests' interpreter stands in for it.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


def environment(mnist_url: str, **extra: str) -> dict:
    """The stages' environment: this interpreter's venv first, MNIST from the local server,
    no tracking or DVC settings leaking in from the caller."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "DVC_")) and key != "MNIST_MIRROR"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MNIST_MIRROR"] = mnist_url
    env.update(extra)
    return env


def run(project: Path, command: list[str], env: dict, check: bool = True, timeout: int = 900):
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def written_files(folder: Path) -> list[Path]:
    """Files a stage wrote under `folder`. Not counted: the .gitignore files DVC keeps there, the bytecode
    Python writes for the project's modules, and the scratch of DVC and the warm process (.dvc/tmp)."""
    return [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.name != ".gitignore"
        and "__pycache__" not in path.parts
        and ".dvc/tmp/" not in path.as_posix()
    ]


def stop(process: subprocess.Popen) -> None:
    """Stops a server started with start_new_session=True, with everything it spawned.

    Waits longer than `make ui` gives its server to stop (UI_STOP_SECONDS, then it kills the server's
    own session): killed before that, the wrapper would leave the server running, orphaned.
    """
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=UI_STOP_SECONDS + 15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Waits until a server started as `process` answers at `url` (any HTTP status counts)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError as error:
            if getattr(error, "code", None):  # an HTTP error status: the server answers
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up: {process.args}") from error
            time.sleep(0.5)


def run_stage_process(project: Path, env: dict, name: str, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """(result, wall seconds) of one stage run alone, `python -m pipeline.<name>`, allowed to fail."""
    started = time.monotonic()
    result = run(project, [sys.executable, "-m", f"pipeline.{name}"], {**env, **extra}, check=False)
    return result, time.monotonic() - started


def served_classes(project: Path, env: dict, count: int, log: Path | None = None, **variables: str) -> np.ndarray:
    """`make serve` on a free loopback port; the classes it answers for the first `count` test images.
    log: a file that receives the server's output."""
    port = free_port()
    settings = [f"{key}={value}" for key, value in variables.items()]
    output = log.open("w") if log else subprocess.DEVNULL
    server = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"PORT={port}", *settings],
        cwd=project,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, seconds=180)
        images = np.load(project / "data/prepared/test_images.npy")[:count]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            method="POST",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return np.asarray(json.load(response)["predictions"]).argmax(axis=1)
    finally:
        stop(server)
        if log:
            output.close()


def render(url: str, screenshot: Path, height: int = 1400) -> str:
    """The page's DOM after its scripts ran, and a screenshot `height` pixels tall, from headless Chromium."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={screenshot.parent / 'chromium-profile'}",
        f"--window-size=1600,{height}",
        "--virtual-time-budget=20000",
        "--run-all-compositor-stages-before-draw",  # else charts are still spinners in the screenshot
    ]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
