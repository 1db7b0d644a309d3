"""Races and faults: one dvc run per checkout, stages that stop with their dvc, damaged files between
stages, diverged trainings, and error lines that name the user's paths.

The fast tests check the deciding helpers with real files and real processes; the slow ones run DVC,
TensorFlow and MLflow on tiny projects."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from filelock import FileLock

from pipeline import runtime
from pipeline.data_io import (
    atomic_write_text,
    load_array,
    load_model,
    read_json,
    read_manifest,
    read_run_id,
    staged_outputs,
)
from pipeline.errors import PipelineError, describe_os_error
from tests.helpers import MAKE, REPO, environment, error_lines, make_project, run, run_stage_process, written_files
from tests.test_interrupt import SLOW

ONE_AT_A_TIME = (
    "run experiments one at a time in a checkout, or side by side with `dvc exp run --queue` (then "
    "`dvc queue start`) or `dvc exp run --temp`"
)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """An empty folder with the project's dvc.yaml and a params.yaml, as the working directory."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Damaged files between stages


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda path: os.truncate(path, 1000), "1000 bytes where its header needs 15808: truncated or overwritten"),
        (lambda path: path.write_bytes(b"not an array"), "not a NumPy array file"),
        (lambda path: np.save(path, np.zeros((5, 28, 28), np.float64)), "holds float64 values, expected float32"),
        (lambda path: np.save(path, np.zeros((4, 28, 28), np.float32)), "shape (4, 28, 28), expected (5, 28, 28)"),
    ],
    ids=["truncated", "foreign", "dtype", "shape"],
)
def test_a_damaged_array_is_one_line_naming_the_file_and_the_fix(checkout, damage, expected):
    path = Path("data/prepared/test_images.npy")
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((5, 28, 28), np.float32))
    assert load_array(path, "float32", (None, 28, 28)).shape == (5, 28, 28)
    damage(path)
    with pytest.raises(PipelineError) as raised:
        load_array(path, "float32", (5, 28, 28))
    message = str(raised.value)
    assert message.startswith(f"{path} is damaged (") and expected in message
    assert message.endswith(
        "; restore it with `dvc checkout --force data/prepared` or rebuild it with `dvc repro --force preprocess`"
    )


def test_damaged_json_and_model_name_the_stage_that_writes_them(checkout):
    Path("models").mkdir()
    Path("models/run.json").write_text('{"run_id": ')
    with pytest.raises(PipelineError, match=r"^models/run.json is damaged \(not valid JSON: .*\); restore it with "):
        read_json(Path("models/run.json"))
    Path("models/run.json").write_text('{"experiment_id": "1"}')  # valid JSON, without the run
    with pytest.raises(PipelineError) as raised:
        read_run_id()
    assert str(raised.value) == (
        'models/run.json is damaged (no MLflow run id under "run_id"); restore it with '
        "`dvc checkout --force models/run.json` or rebuild it with `dvc repro --force train`"
    )
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/manifest.json").write_text('{"splits": {}}')
    with pytest.raises(PipelineError) as raised:
        read_manifest()
    assert str(raised.value) == (
        "data/prepared/manifest.json is damaged (not preprocess's manifest: it needs config, data_hash and "
        "splits); restore it with `dvc checkout --force data/prepared` or rebuild it with "
        "`dvc repro --force preprocess`"
    )
    Path("models/model.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PipelineError) as raised:
        load_model(Path("models/model.keras"))
    assert str(raised.value) == (
        "models/model.keras is damaged (not a complete Keras archive: File is not a zip file); restore it with "
        "`dvc checkout --force models/model.keras` or rebuild it with `dvc repro --force train`"
    )


# Error lines name the user's paths


def test_errors_about_staged_outputs_name_the_destination(checkout):
    Path("reports/metrics.json").mkdir(parents=True)  # a folder where the output must land
    (Path("reports/metrics.json") / "keep").write_text("")
    with pytest.raises(OSError) as raised, staged_outputs() as staged:
        atomic_write_text(staged / Path("reports/metrics.json"), "{}")
    assert raised.value.filename == "reports/metrics.json"
    assert describe_os_error(raised.value).startswith("reports/metrics.json is in the way (")
    assert not list(checkout.glob(".staged-*"))


def test_errors_about_a_temporary_name_the_destination(checkout):
    Path("reports/metrics.json").mkdir(parents=True)
    (Path("reports/metrics.json") / "keep").write_text("")
    with pytest.raises(OSError) as raised:
        atomic_write_text(Path("reports/metrics.json"), "{}")
    assert raised.value.filename == "reports/metrics.json"


# One dvc run per checkout


def fake_dvc(tmp_path: Path, *arguments: str) -> subprocess.Popen:
    """A live process whose command line is a dvc command's: `python .../dvc <arguments>`; returned once
    it runs the script (until then, the fork has its parent's command line)."""
    script = tmp_path / "bin" / "dvc"
    script.parent.mkdir(exist_ok=True)
    script.write_text("import time\nprint('running', flush=True)\ntime.sleep(120)\n")
    process = subprocess.Popen([sys.executable, str(script), *arguments], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "running\n"
    return process


def test_a_second_dvc_run_in_a_checkout_is_refused_until_the_first_ends(checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train")
    first, second = fake_dvc(tmp_path, "exp", "run", "-S", "train.seed=1"), fake_dvc(tmp_path, "repro")
    try:
        first_process, second_process = psutil.Process(first.pid), psutil.Process(second.pid)
        runtime.claim_checkout(first_process)
        runtime.claim_checkout(first_process)  # its own next stage
        with pytest.raises(PipelineError) as raised:
            runtime.claim_checkout(second_process)
        assert str(raised.value) == (
            f"`dvc exp run -S train.seed=1` (pid {first.pid}) is running in this checkout, and two runs in one "
            f"checkout overwrite each other's params.yaml and outputs; wait for it to end: {ONE_AT_A_TIME}"
        )
        Path("params.yaml").write_text("train:\n  seed: 2\n")  # what the second one's DVC did before its stage
        with pytest.raises(PipelineError) as raised:
            runtime.claim_checkout(first_process)
        assert str(raised.value) == (
            f"params.yaml changed while this dvc run (pid {first.pid}) was running its stages (another "
            f"`dvc exp run` or `dvc repro` in this checkout, or an edit): {ONE_AT_A_TIME}"
        )
        first.kill()
        first.wait()
        runtime.claim_checkout(second_process)  # the first has ended: the checkout is free
        assert json.loads(runtime.CHECKOUT_RUN_FILE.read_text())["pid"] == second.pid
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_a_stage_does_not_reopen_a_run_once_params_changed_under_its_dvc(checkout, tmp_path, monkeypatch):
    """A `dvc exp apply` between train and evaluate puts back an older model's params.yaml and run.json:
    evaluate stops before it reopens that run, which stays FINISHED with nothing logged."""
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with mlflow.start_run() as older:
        mlflow.log_metric("test_accuracy", 0.9)
    before = mlflow.get_run(older.info.run_id).info
    Path("models").mkdir()
    Path("models/run.json").write_text(json.dumps({"run_id": older.info.run_id}))
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    dvc = fake_dvc(tmp_path, "repro")
    try:
        runtime.claim_checkout(psutil.Process(dvc.pid))
        Path("params.yaml").write_text("train:\n  seed: 2\n")  # the applied experiment's
        with pytest.raises(PipelineError) as raised, tracking.model_run():
            pass
        assert str(raised.value).startswith(f"params.yaml changed while this dvc run (pid {dvc.pid}) was running")
        assert str(raised.value).endswith(f"; MLflow run {older.info.run_id} (from models/run.json) is left as it was")
    finally:
        dvc.kill()
        dvc.wait()
    after = mlflow.get_run(older.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert mlflow.MlflowClient().list_artifacts(older.info.run_id) == []


def test_a_stage_that_finds_no_store_says_so_and_creates_none(checkout, tmp_path, monkeypatch):
    from pipeline import tracking

    store = tmp_path / "moved-away" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    Path("models").mkdir()
    Path("models/run.json").write_text(json.dumps({"run_id": "8191e447"}))
    with pytest.raises(PipelineError) as raised, tracking.model_run():
        pass
    assert str(raised.value) == (
        f"MLflow run 8191e447 (from models/run.json) cannot be in sqlite:///{store}: there is no store there; "
        "point MLFLOW_TRACKING_URI at the store that holds it, or retrain with `dvc repro --force train`"
    )
    assert not store.parent.exists()


def test_a_claim_held_by_a_stopped_process_is_one_line_not_a_hang(checkout, monkeypatch):
    """A stage paused with Ctrl-Z while it held the claim's lock: the next claim waits, then says so."""
    runtime.CHECKOUT_RUN_FILE.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)",
            f"{runtime.CHECKOUT_RUN_FILE}.lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(runtime, "CLAIM_WAIT_SECONDS", 0.5)
        with pytest.raises(PipelineError) as raised:
            runtime.claim_checkout_to_compose()
        assert str(raised.value) == (
            "waited 0.5 s for .dvc/tmp/pipeline-run.json.lock, which another process holds (a stage or dvc stopped "
            "with Ctrl-Z, or stuck): resume or end it (`ps` shows it), then run again"
        )
    finally:
        holder.kill()
        holder.wait()


def test_make_params_and_reset_are_refused_while_a_dvc_run_holds_the_checkout(checkout, tmp_path, monkeypatch):
    """`make params` and `make reset` would rewrite params.yaml (reset: outputs too) under the run: refused
    before they write, and they claim nothing."""
    from pipeline.config import reset

    first = fake_dvc(tmp_path, "repro")
    try:
        monkeypatch.setenv("DVC_STAGE", "train")
        runtime.claim_checkout(psutil.Process(first.pid))
        monkeypatch.delenv("DVC_STAGE")
        claim = runtime.CHECKOUT_RUN_FILE.read_text()
        for refused in (runtime.claim_checkout_to_compose, reset):
            with pytest.raises(PipelineError, match=rf"^`dvc repro` \(pid {first.pid}\) is running in this checkout"):
                refused()
        assert runtime.CHECKOUT_RUN_FILE.read_text() == claim
        assert Path("params.yaml").read_text() == "train:\n  seed: 1\n"
    finally:
        first.kill()
        first.wait()
    runtime.claim_checkout_to_compose()  # the run has ended: nothing to refuse
    assert runtime.CHECKOUT_RUN_FILE.read_text() == claim  # and nothing recorded


def test_only_the_dvc_command_counts_as_dvc(tmp_path):
    dvc = fake_dvc(tmp_path, "exp", "run")
    try:
        assert runtime.dvc_command(psutil.Process(dvc.pid)) == "dvc exp run"
        assert runtime.dvc_command(psutil.Process()) is None
    finally:
        dvc.kill()
        dvc.wait()


# A stage stops with its dvc

STAGE = textwrap.dedent(
    """
    import sys, time
    import psutil
    from pipeline import runtime
    from pipeline.errors import guard

    def stage():
        print("started", flush=True)
        time.sleep(60)

    runtime.stop_with(psutil.Process().parent())
    guard("train", stage, interrupted="run `dvc repro` again")
    """
)


def test_a_stage_whose_parent_dies_takes_the_interrupted_path(tmp_path):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]],"
            " stdout=sys.stdout, stderr=open(sys.argv[2], 'w'), cwd=sys.argv[3]); time.sleep(60)",
            STAGE,
            str(tmp_path / "stderr"),
            str(REPO),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline() == "started\n"
        [stage] = psutil.Process(parent.pid).children()
        parent.send_signal(signal.SIGTERM)  # what a process manager or a closed terminal does to dvc
        started = time.monotonic()
        stage.wait(timeout=10)  # not our child: psutil cannot tell its exit status, the line tells its path
        assert time.monotonic() - started < 5
        assert error_lines((tmp_path / "stderr").read_text()) == ["error: train: interrupted; run `dvc repro` again"]
    finally:
        parent.kill()
        parent.wait()


# End to end, on tiny projects


def outputs(project: Path) -> dict:
    return {
        path: path.read_bytes()
        for folder in ("data/prepared", "models", "reports", "data/predictions")
        for path in written_files(project / folder)
    }


def runs(project: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])


def one_error_line(result: subprocess.CompletedProcess, exit_code: int = 1) -> str:
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, damage, expected",
    [
        (
            "preprocess",
            lambda project: os.truncate(project / "data/raw/train-images-idx3-ubyte", 100_000),
            "data/raw/train-images-idx3-ubyte is damaged (100000 bytes, MNIST's file has 47040016); restore it "
            "with `dvc checkout --force data/raw` or rebuild it with `dvc repro --force download`",
        ),
        (
            "preprocess",
            lambda project: flip_a_byte(project / "data/raw/t10k-labels-idx1-ubyte"),
            "data/raw/t10k-labels-idx1-ubyte is damaged (its content does not match MNIST's SHA-256); restore it "
            "with `dvc checkout --force data/raw` or rebuild it with `dvc repro --force download`",
        ),
        (
            "evaluate",
            lambda project: os.truncate(project / "data/prepared/test_images.npy", 5000),
            "data/prepared/test_images.npy is damaged (5000 bytes where its header needs 940928: truncated or "
            "overwritten); restore it with `dvc checkout --force data/prepared` or rebuild it with "
            "`dvc repro --force preprocess`",
        ),
        (
            "train",
            lambda project: flip_a_byte(project / "data/prepared/train_images.npy"),
            "data/prepared/train_images.npy is damaged (with train_labels.npy, its content does not match the "
            "SHA-256 in data/prepared/manifest.json); restore it with `dvc checkout --force data/prepared` or "
            "rebuild it with `dvc repro --force preprocess`",
        ),
        (
            "evaluate",
            lambda project: os.truncate(project / "models/model.keras", 100_000),
            "models/model.keras is damaged (not a complete Keras archive: File is not a zip file); restore it with "
            "`dvc checkout --force models/model.keras` or rebuild it with `dvc repro --force train`",
        ),
        (
            "error_analysis",
            lambda project: os.truncate(project / "data/predictions/test_probabilities.npy", 200),
            "data/predictions/test_probabilities.npy is damaged (200 bytes where its header needs 12128: truncated "
            "or overwritten); restore it with `dvc checkout --force data/predictions` or rebuild it with "
            "`dvc repro --force evaluate`",
        ),
        (
            "evaluate",
            lambda project: (project / "models/run.json").write_text('{"run_id": "0123'),
            "models/run.json is damaged (not valid JSON: Unterminated string starting at: line 1 column 12 (char "
            "11)); restore it with `dvc checkout --force models/run.json` or rebuild it with "
            "`dvc repro --force train`",
        ),
    ],
    ids=[
        "truncated-raw",
        "changed-raw",
        "truncated-array",
        "changed-array",
        "truncated-model",
        "truncated-predictions",
        "damaged-run-json",
    ],
)
def test_a_damaged_file_from_an_earlier_stage_is_one_line_and_the_named_fix_works(
    trained_copy, stage, damage, expected
):
    project, env = trained_copy
    runs_before = [(run.info.run_id, run.info.status) for run in runs(project)]
    damage(project)
    before = outputs(project)
    result, _ = run_stage_process(project, env, stage)
    line = one_error_line(result)
    assert line == f"error: {stage.replace('_', '-')}: {expected}"
    assert outputs(project) == before
    assert [(run.info.run_id, run.info.status) for run in runs(project)] == runs_before

    fix = line.split("restore it with `")[1].split("`")[0]
    run(project, fix.split(), env)
    assert run_stage_process(project, env, stage)[0].returncode == 0


def flip_a_byte(path: Path) -> None:
    """Changes the content, not the size: only the manifest's hash can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_an_output_that_cannot_land_is_named_by_its_own_path(trained_copy):
    project, env = trained_copy
    report = project / "reports/classification_report.json"
    report.unlink()
    report.mkdir()
    (report / "keep").write_text("")
    result, _ = run_stage_process(project, env, "evaluate")
    line = one_error_line(result)
    assert line.startswith("error: evaluate: reports/classification_report.json is in the way ("), line
    assert ".staged-" not in result.stderr and ".tmp-" not in result.stderr
    assert not list(project.glob(".staged-*"))


@pytest.mark.slow
def test_a_diverged_training_stops_with_one_line_and_lands_no_model(trained_copy):
    from pipeline.config import write_params

    project, env = trained_copy
    write_params(
        ["data.limit=300", "train.epochs=2", "train.learning_rate=1e30"],
        conf_dir=project / "conf",
        params_file=project / "params.yaml",
    )
    before = outputs(project)
    result, _ = run_stage_process(project, env, "train")
    assert one_error_line(result) == (
        "error: train: the training diverged in epoch 1 (loss nan, val_loss nan); lower train.learning_rate "
        "(now 1e+30) and run again; no model was saved"
    )
    assert outputs(project) == before
    statuses = sorted(run.info.status for run in runs(project))
    assert statuses == ["FAILED", "FINISHED"]  # the diverged run, and the tiny pipeline's own
    [diverged] = [run for run in runs(project) if run.info.status == "FAILED"]
    assert "loss" not in diverged.data.metrics  # the non-finite epoch is neither logged nor checkpointed
    assert not list(project.glob(".train-checkpoints/*/last-epoch.npz"))


def stage_processes(dvc: subprocess.Popen, module: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(dvc.pid).children(recursive=True):
        try:
            if f"pipeline.{module}" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass  # ended meanwhile (an earlier stage, a git call)
    return found


def wait_for_stage(dvc: subprocess.Popen, module: str) -> None:
    deadline = time.monotonic() + 300
    while not stage_processes(dvc, module):
        assert dvc.poll() is None and time.monotonic() < deadline, f"dvc ended before its {module} stage started"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_experiment_in_a_busy_checkout_stops_and_no_run_is_mislabeled(tmp_path, mnist_url):
    """Two `dvc exp run` at once in one checkout, a `dvc repro` and a `--temp` one beside them, as real
    processes. The first one's training is paused (SIGSTOP) while the others start, so that each of
    them meets it in the same place whatever the machine's speed."""
    project = make_project(tmp_path, ["data.limit=1000", "train.epochs=2"], shrink_conf=True)
    env = environment(mnist_url)

    def dvc(*arguments: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["dvc", *arguments], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    first = dvc("exp", "run", "--name", "first-seed1", "-S", "train.seed=1")
    wait_for_stage(first, "train")
    training = stage_processes(first, "train")
    with FileLock(f"{project / runtime.CHECKOUT_RUN_FILE}.lock"):  # not paused while it holds the claim's lock
        for process in training:
            process.suspend()
    try:
        params_before = (project / "params.yaml").read_bytes()
        second = dvc("exp", "run", "--name", "second-seed2", "-S", "train.seed=2")
        second_output = second.communicate(timeout=300)[0].decode()
        repro = dvc("repro")
        repro_output = repro.communicate(timeout=300)[0].decode()
        make_run = run(project, [*MAKE, "run"], env, check=False)
        beside = dvc("exp", "run", "--temp", "--name", "beside-seed3", "-S", "train.seed=3")
        wait_for_stage(beside, "train")  # past DVC's stash of it, which touches the workspace
    finally:
        for process in training:
            process.resume()

    # -S: refused in DVC's composition of conf/, before DVC wrote params.yaml or ran a stage.
    assert second.returncode != 0
    assert [line for line in second_output.splitlines() if line.startswith("ERROR")] == [
        f"ERROR: `dvc exp run --name first-seed1 -S train.seed=1` (pid {first.pid}) is running in this checkout, "
        f"and two runs in one checkout overwrite each other's params.yaml and outputs; wait for it to end: "
        f"{ONE_AT_A_TIME}"
    ], second_output[-3000:]
    assert "Running stage" not in second_output
    assert (project / "params.yaml").read_bytes() == params_before
    # Without -S, DVC composes nothing: its own stage lock refuses when it meets the first's stage (the
    # `params` stage writes params.yaml, which the training reads), else our line at its first stage.
    assert repro.returncode != 0 and "Running stage 'download'" not in repro_output
    assert f"'{project / 'params.yaml'}' is busy, it is being blocked by:\n  (PID {first.pid}): " in repro_output or [
        line for line in repro_output.splitlines() if line.startswith("error: ")
    ] == [
        f"error: params: `dvc exp run --name first-seed1 -S train.seed=1` (pid {first.pid}) is running in this "
        f"checkout, and two runs in one checkout overwrite each other's params.yaml and outputs; wait for it to "
        f"end: {ONE_AT_A_TIME}"
    ], repro_output[-3000:]
    # `make run` checks before its `dvc repro` starts: our line, always.
    assert make_run.returncode != 0 and "Running stage" not in make_run.stdout
    assert error_lines(make_run.stderr) == [
        f"error: run: `dvc exp run --name first-seed1 -S train.seed=1` (pid {first.pid}) is running in this "
        f"checkout, and two runs in one checkout overwrite each other's params.yaml and outputs; wait for it to "
        f"end: {ONE_AT_A_TIME}"
    ], make_run.stderr[-3000:]

    first_output, beside_output = (process.communicate(timeout=600)[0].decode() for process in (first, beside))
    assert first.returncode == 0, first_output[-3000:]  # the first finishes as itself
    assert beside.returncode == 0, beside_output[-3000:]  # in a copy of its own: not refused
    tracked = {
        (run.data.tags.get("dvc.exp_name"), run.info.status, run.data.params["train.seed"]) for run in runs(project)
    }
    assert tracked == {("first-seed1", "FINISHED", "1"), ("beside-seed3", "FINISHED", "3")}


@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_stage_whose_dvc_is_killed_stops_and_the_next_repro_resumes(tmp_path, mnist_url, warm):
    project = make_project(tmp_path, SLOW)
    env = environment(mnist_url)
    if warm:  # the stage runs as a fork of the warm process; dvc starts its stand-in
        warm_process = [sys.executable, "-m", "commands.warm"]
        assert "warm: ready" in run(project, [*warm_process, "start", "--idle-minutes", "10"], env).stderr
    try:
        kill_dvc_during_training(project, env)
        if warm:
            assert "exit 130" in (project / ".dvc/tmp/warm/log").read_text().splitlines()[-1]
    finally:
        if warm:
            run(project, [*warm_process, "stop"], env)

    resumed = run(project, ["dvc", "repro", "evaluate"], env)
    assert "train: resuming after epoch " in resumed.stderr  # 1, or 2 when dvc died in the last one
    [finished] = runs(project)
    assert finished.info.status == "FINISHED" and "test_accuracy" in finished.data.metrics


def kill_dvc_during_training(project: Path, env: dict) -> None:
    """SIGTERM to dvc alone once the first epoch is checkpointed: the training stops as if interrupted."""
    dvc = subprocess.Popen(
        ["dvc", "repro", "evaluate"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not list(project.glob(".train-checkpoints/*/last-epoch.npz")):
        assert dvc.poll() is None and time.monotonic() < deadline, "training ended before its first epoch did"
        time.sleep(0.05)
    [training] = [process for process in stage_processes(dvc, "train") if process.name().startswith("python")]
    dvc.send_signal(signal.SIGTERM)  # dvc alone, as a process manager or a closed terminal does
    stderr = dvc.communicate(timeout=60)[1].decode()
    assert dvc.returncode == -signal.SIGTERM
    training.wait(timeout=30)
    assert "error: train: interrupted; run `dvc repro` again (training resumes from its last completed epoch)" in (
        stderr
    )
    assert not (project / "models/model.keras").exists()
    [interrupted] = runs(project)
    assert interrupted.info.status == "FAILED"
