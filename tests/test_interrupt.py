"""A training killed mid-epoch resumes from its last completed epoch and ends exactly where an
uninterrupted one does, in one complete MLflow run; under another numeric environment it starts over."""

import json
import signal
import subprocess
import time

import keras
import mlflow
import numpy as np
import psutil
import pytest

from tests.helpers import environment, make_project, run

# Long enough epochs (a few seconds) to be killed in the middle of one; 188 steps per epoch, run
# 10 at a time, which does not divide them. A tiny CNN: its dropout and random shifts draw from seed
# states and its learning rate follows a schedule, all of which a resume must restore.
SLOW = [
    "data.limit=3000",
    "train.epochs=2",
    "train.batch_size=16",
    "train.steps_per_execution=10",
    "model=cnn",
    "model.filters=[4]",
    "model.dense_units=16",
    "train.schedule=warmup_cosine",
]


@pytest.mark.parametrize(
    "steps_per_epoch, configured, expected", [(860, 100, 86), (188, 10, 4), (5, 100, 5), (101, 100, 1), (86, 100, 86)]
)
def test_calls_never_straddle_an_epoch(steps_per_epoch, configured, expected):
    from pipeline.train import steps_per_call

    assert steps_per_call(steps_per_epoch, configured) == expected


def weights(project) -> list[np.ndarray]:
    return keras.models.load_model(project / "models/model.keras", safe_mode=True).get_weights()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_url):
    project = make_project(tmp_path_factory.mktemp("uninterrupted"), SLOW)
    run(project, ["dvc", "repro", "evaluate"], environment(mnist_url))  # the weights and metrics compared
    return weights(project), json.loads((project / "reports/metrics.json").read_text())


def kill_training_after_first_epoch(project, env, signal_number) -> None:
    pipeline = subprocess.Popen(
        ["dvc", "repro", "evaluate"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(project.glob(".train-checkpoints/*/last-epoch.npz")):
        assert pipeline.poll() is None and time.monotonic() < deadline, "training ended before its first epoch did"
        time.sleep(0.05)

    # DVC runs the stage through $SHELL, which may or may not exec python: signal the python process
    # itself, not a child it forked for a moment (that child has the same command line).
    def is_training(process: psutil.Process) -> bool:
        try:
            return process.cmdline()[1:3] == ["-m", "pipeline.train"]
        except psutil.Error:
            return False

    [training] = [
        child
        for child in psutil.Process(pipeline.pid).children(recursive=True)
        if is_training(child) and not is_training(child.parent())
    ]
    training.send_signal(signal_number)
    assert pipeline.wait(timeout=120) != 0


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_resumes_to_identical_weights(tmp_path, mnist_url, uninterrupted, signal_number):
    project = make_project(tmp_path, SLOW)
    env = environment(mnist_url)
    kill_training_after_first_epoch(project, env, signal_number)
    assert not (project / "models/model.keras").exists()

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [interrupted] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    expected_status = "FAILED" if signal_number == signal.SIGTERM else "RUNNING"
    assert interrupted.info.status == expected_status

    resumed = run(project, ["dvc", "repro", "evaluate"], env)
    assert "train: resuming after epoch" in resumed.stderr

    reference_weights, reference_metrics = uninterrupted
    for ours, reference in zip(weights(project), reference_weights, strict=True):
        np.testing.assert_array_equal(ours, reference)
    assert json.loads((project / "reports/metrics.json").read_text()) == reference_metrics

    [final] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert final.info.run_id == interrupted.info.run_id and final.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(final.info.run_id, "val_accuracy")
    assert sorted({point.step for point in history}) == [1, 2]  # epochs 1 and 2: the resumed one logged once
    assert not list(project.glob(".train-checkpoints/*"))


@pytest.mark.slow
def test_a_training_killed_under_other_kernels_starts_over(tmp_path, mnist_url):
    project = make_project(tmp_path, SLOW)
    kill_training_after_first_epoch(project, environment(mnist_url), signal.SIGTERM)

    again = run(project, ["dvc", "repro", "evaluate"], environment(mnist_url, TF_ENABLE_ONEDNN_OPTS="0"))
    assert "train: resuming" not in again.stderr
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert sorted(tracked.info.status for tracked in runs) == ["FAILED", "FINISHED"]
