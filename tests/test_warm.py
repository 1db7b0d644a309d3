"""The warm process: the stages run as forks of one process that has imported TensorFlow, MLflow & co.,
with the same results, errors and exit codes as in processes of their own. The first stage that finds
none starts it in the background (off under CI and pytest: the tests that want it set PIPELINE_WARM=1);
one that is stuck, gone or started elsewhere is replaced, and the stage runs in its own process."""

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

from commands import warm as warm_module
from tests.helpers import error_lines, run

STAGES = ["config", "download", "preprocess", "train", "evaluate", "error_analysis"]
# What the stages write, byte for byte the same whether they run as forks or in processes of their own.
OUTPUTS = [
    "data/prepared/train_images.npy",
    "data/prepared/validation_labels.npy",
    "data/predictions/test_probabilities.npy",
    "reports/training_history.csv",
    "reports/classification_report.json",
    "reports/metrics.json",
]
STARTED = "warm: started a process with TensorFlow, MLflow & co. imported"


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
    return [line for line in (project / ".dvc/tmp/warm/log").read_text().splitlines() if " exit " in line]


def outputs(project) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in OUTPUTS}


def ready_warm_pid(project, seconds: float = 300) -> int:
    """The pid of the project's warm process once it is ready for stages."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            pid = int((project / ".dvc/tmp/warm/pid").read_text())
            log = (project / ".dvc/tmp/warm/log").read_text()
            if "warm: ready in " in log and f"(pid {pid})\n" in log and Path(f"/proc/{pid}").exists():
                return pid
        except (OSError, ValueError):
            pass  # not written yet
        assert time.monotonic() < deadline, "the warm process did not become ready"
        time.sleep(0.2)


def ended(pid: int) -> bool:
    """Whether the process has exited (a zombie too: where no init reaps it, it stays in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def catches(pid: int, number: int) -> bool:
    """Whether the process has a handler of its own for the signal (SigCgt in /proc/<pid>/status)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (number - 1) & 1)


def warm_processes(project) -> list[int]:
    """The pids of the warm processes started for the project."""
    pids = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if b"commands.warm\0serve" in (process / "cmdline").read_bytes() and (process / "cwd").resolve() == project:
                pids.append(int(process.name))
        except OSError:
            pass  # ended meanwhile
    return pids


@pytest.mark.parametrize(
    ("environment", "starts"),
    [
        ({}, True),  # a user's shell
        ({"CI": "true"}, False),
        ({"CI": "false"}, True),
        ({"PYTEST_CURRENT_TEST": "tests/test_x.py::test_y (call)"}, False),
        ({"PIPELINE_WARM": "0"}, False),
        ({"PIPELINE_WARM": "1", "CI": "true"}, True),
        ({"PIPELINE_WARM": "1", "PYTEST_CURRENT_TEST": "tests/test_x.py::test_y (call)"}, True),
    ],
)
def test_whether_a_stage_starts_a_warm_process(monkeypatch, environment, starts):
    for name in ("CI", "PYTEST_CURRENT_TEST", "PIPELINE_WARM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert warm_module.starts_by_default("train") is starts


def test_a_switch_value_that_is_neither_0_nor_1_is_refused(monkeypatch):
    monkeypatch.setenv("PIPELINE_WARM", "off")
    with pytest.raises(SystemExit) as refused:
        warm_module.starts_by_default("train")
    assert str(refused.value) == (
        "error: train: PIPELINE_WARM=off is neither 0 (stages never start a warm process) nor 1 "
        "(the first stage that finds none starts one); set one of them, or unset it"
    )


@pytest.mark.slow
def test_the_first_stage_starts_one_in_the_background_and_the_next_run_uses_it(trained_copy):
    project, env = trained_copy
    env = {**env, "PIPELINE_WARM": "1"}  # on, as in a user's shell
    cold_outputs = outputs(project)
    try:
        first = run(project, ["dvc", "repro", "--force"], env, timeout=300)  # returns: no pipe held open

        [line] = [line for line in first.stderr.splitlines() if line.startswith("warm:")]
        assert line.startswith(STARTED) and line.endswith("`make cold` stops it, PIPELINE_WARM=0 starts none")
        assert outputs(project) == cold_outputs
        pid = ready_warm_pid(project)
        assert os.getsid(pid) == pid  # its own session: Ctrl-C in the terminal does not reach it
        streams = [os.readlink(f"/proc/{pid}/fd/{number}") for number in (0, 1, 2)]
        assert streams == ["/dev/null", *[str(project / ".dvc/tmp/warm/log")] * 2]

        second = run(project, ["dvc", "repro", "--force"], env, timeout=300)

        assert "warm:" not in second.stderr
        assert [line.split(" in ")[0].split()[-1] for line in served(project)[-len(STAGES) :]] == [
            f"pipeline.{stage}" for stage in STAGES
        ]
        assert outputs(project) == cold_outputs
    finally:
        warm(project, env, "stop")


@pytest.mark.slow
def test_two_stages_at_once_start_one_warm_process(trained_copy):
    project, env = trained_copy
    env = {**env, "PIPELINE_WARM": "1"}
    stages = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.download"], cwd=project, env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        said = [stage.communicate(timeout=120)[1] for stage in stages]

        assert [stage.returncode for stage in stages] == [0, 0]
        assert sum(STARTED in stderr for stderr in said) == 1
        pid = ready_warm_pid(project)
        assert warm_processes(project) == [pid]
    finally:
        warm(project, env, "stop")


@pytest.mark.slow
def test_stages_run_in_the_warm_process_with_the_same_results(warm_project):
    project, env = warm_project
    cold_metrics = json.loads((project / "reports/metrics.json").read_text())

    result = run(project, ["dvc", "repro", "--force"], env)

    assert "warm:" not in result.stderr  # no stage was turned away
    for stage in STAGES:
        assert any(f"pipeline.{stage} in {project}: exit 0" in line for line in served(project)), stage
    assert json.loads((project / "reports/metrics.json").read_text()) == cold_metrics
    assert "Results: test accuracy" in result.stderr  # the stages' own output reaches the terminal


@pytest.mark.slow
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


@pytest.mark.slow
def test_another_environment_runs_the_stage_in_its_own_process(warm_project):
    project, env = warm_project
    before = len(served(project))

    result = run(project, [sys.executable, "-m", "pipeline.download"], {**env, "TF_NUM_INTRAOP_THREADS": "1"})

    assert (
        "warm: the warm process was started in another environment (TF_NUM_INTRAOP_THREADS differ) "
        "(`make cold`, then `make warm`, replaces it); this stage runs in its own process"
    ) in result.stderr
    assert len(served(project)) == before


@pytest.mark.slow
def test_with_the_default_on_a_warm_process_from_another_environment_is_replaced(warm_project):
    project, env = warm_project
    old = int((project / ".dvc/tmp/warm/pid").read_text())
    other = {**env, "TF_NUM_INTRAOP_THREADS": "1", "PIPELINE_WARM": "1"}

    result = run(project, [sys.executable, "-m", "pipeline.download"], other)

    [line] = [line for line in result.stderr.splitlines() if line.startswith("warm:")]
    assert line.startswith(
        "warm: the warm process was started in another environment (TF_NUM_INTRAOP_THREADS differ): "
        "replaced by one started here (pid "
    )
    assert ended(old)
    ready_warm_pid(project)
    run(project, [sys.executable, "-m", "pipeline.download"], other)
    assert "pipeline.download" in served(project)[-1]


@pytest.mark.slow
def test_a_stuck_warm_process_leaves_the_stage_to_run_in_its_own_process(warm_project):
    project, env = warm_project
    pid = int((project / ".dvc/tmp/warm/pid").read_text())
    before = len(served(project))
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = run(project, [sys.executable, "-m", "pipeline.download"], env)

        assert time.monotonic() - started < warm_module.ANSWER_SECONDS + 30
        assert (
            f"warm: the warm process did not answer in {warm_module.ANSWER_SECONDS} s "
            "(`make cold`, then `make warm`, replaces it); this stage runs in its own process"
        ) in result.stderr
        assert (project / "data/raw").is_dir()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(served(project)) == before


@pytest.mark.slow
def test_a_warm_process_that_dies_during_a_stage_leaves_it_to_run_in_its_own_process(warm_project):
    project, env = warm_project
    pid = int((project / ".dvc/tmp/warm/pid").read_text())
    cold_outputs = outputs(project)
    stand_in = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    # The stand-in has the stage's pid once it passes SIGTERM on to it: the stage runs as a fork.
    while not catches(stand_in.pid, signal.SIGTERM):
        assert stand_in.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(pid, signal.SIGKILL)  # the warm process, with its forks
    _, stderr = stand_in.communicate(timeout=300)

    assert stand_in.returncode == 0, stderr
    assert (
        "warm: the warm process ended during this stage (`make cold`, then `make warm`, replaces it); "
        "this stage runs in its own process"
    ) in stderr.decode()
    assert outputs(project)["reports/training_history.csv"] == cold_outputs["reports/training_history.csv"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_its_socket_is_in_a_folder_only_its_user_can_open(warm_project):
    sockets = Path(tempfile.gettempdir()) / f"mnist-pipeline-{os.getuid()}"
    assert stat.S_IMODE(sockets.lstat().st_mode) == 0o700 and sockets.lstat().st_uid == os.getuid()
    assert [path.stat().st_mode for path in sockets.iterdir() if stat.S_ISSOCK(path.stat().st_mode)]


@pytest.mark.slow
def test_stop_ends_it_and_stages_run_on_their_own_again(warm_project):
    project, env = warm_project
    warm(project, env, "stop")
    before = len(served(project))

    assert not (project / ".dvc/tmp/warm/pid").exists()
    run(project, [sys.executable, "-m", "pipeline.download"], env)
    assert len(served(project)) == before
    assert "warm: not running" in warm(project, env, "stop").stderr
