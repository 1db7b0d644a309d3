"""`make warm`: the stages run as forks of one process that has imported TensorFlow, MLflow & co.,
with the same results, errors and exit codes as in processes of their own."""

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import error_lines, run

pytestmark = pytest.mark.slow
STAGES = ["config", "download", "preprocess", "train", "evaluate", "error_analysis"]


def warm(project, env, action: str) -> subprocess.CompletedProcess:
    return run(project, [sys.executable, "-m", "commands.warm", action, "--idle-minutes", "10"], env)


@pytest.fixture
def warm_project(trained_copy):
    """(project, env): a copy of the tiny pipeline run with a warm process up."""
    project, env = trained_copy
    assert "warm: ready" in warm(project, env, "start").stderr
    yield project, env
    warm(project, env, "stop")


def served(project) -> list[str]:
    """The log's lines: one per stage the warm process ran, with its exit status."""
    return (project / ".dvc/tmp/warm/log").read_text().splitlines()


def test_stages_run_in_the_warm_process_with_the_same_results(warm_project):
    project, env = warm_project
    cold_metrics = json.loads((project / "reports/metrics.json").read_text())

    result = run(project, ["dvc", "repro", "--force"], env)

    assert "warm:" not in result.stderr  # no stage was turned away
    for stage in STAGES:
        assert any(f"pipeline.{stage} in {project}: exit 0" in line for line in served(project)), stage
    assert json.loads((project / "reports/metrics.json").read_text()) == cold_metrics
    assert "Results: test accuracy" in result.stderr  # the stages' own output reaches the terminal


def test_a_stage_error_keeps_its_line_and_exit_code(warm_project):
    project, env = warm_project
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 1", "epochs: 0"))

    result = run(project, [sys.executable, "-m", "pipeline.train"], env, check=False)

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("error: train: ") and "epochs" in line
    assert "Traceback" not in result.stderr
    assert f"pipeline.train in {project}: exit 1 after" in served(project)[-1]


def test_another_environment_runs_the_stage_in_its_own_process(warm_project):
    project, env = warm_project
    before = len(served(project))

    result = run(project, [sys.executable, "-m", "pipeline.download"], {**env, "TF_NUM_INTRAOP_THREADS": "1"})

    assert (
        "warm: the warm process was started in another environment (TF_NUM_INTRAOP_THREADS differ); "
        "`make cold`, then `make warm` in this one; this stage runs in its own process"
    ) in result.stderr
    assert len(served(project)) == before


def test_ctrl_c_reaches_the_stage(warm_project):
    project, env = warm_project
    params = project / "params.yaml"  # an epoch long enough to be interrupted in
    params.write_text(params.read_text().replace("epochs: 1", "epochs: 50").replace("limit: 300", "limit: 20000"))
    stand_in = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(project.glob(".train-checkpoints/*/last-epoch.npz")):
        assert stand_in.poll() is None and time.monotonic() < deadline, "training ended before its first epoch did"
        time.sleep(0.05)
    stand_in.send_signal(signal.SIGINT)  # what Ctrl-C sends to the command in the terminal
    _, stderr = stand_in.communicate(timeout=120)

    assert stand_in.returncode == 130
    assert "error: train: interrupted; run `dvc repro` again (training resumes from its last completed epoch)" in stderr
    assert "exit 130" in served(project)[-1]


def test_its_socket_is_in_a_folder_only_its_user_can_open(warm_project):
    sockets = Path(tempfile.gettempdir()) / f"mnist-pipeline-{os.getuid()}"
    assert stat.S_IMODE(sockets.lstat().st_mode) == 0o700 and sockets.lstat().st_uid == os.getuid()
    assert [path.stat().st_mode for path in sockets.iterdir() if stat.S_ISSOCK(path.stat().st_mode)]


def test_stop_ends_it_and_stages_run_on_their_own_again(warm_project):
    project, env = warm_project
    warm(project, env, "stop")
    before = len(served(project))

    assert not (project / ".dvc/tmp/warm/pid").exists()
    run(project, [sys.executable, "-m", "pipeline.download"], env)
    assert len(served(project)) == before
    assert "warm: not running" in warm(project, env, "stop").stderr
