"""From a run to a model people use: served by MLflow's model server, promoted in the registry, and
its data visible as MLflow datasets."""

import hashlib
import json
import shutil
import socket
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.helpers import error_lines, run, served_classes, venv_for

pytestmark = pytest.mark.slow  # serves the model trained by the shared tiny pipeline run

MAKE = ["make", "--no-print-directory"]


@pytest.fixture
def trained(trained_copy):
    """A copy of the shared tiny pipeline run (promote writes to the registry of its store)."""
    copy, env = trained_copy
    venv_for(copy)
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    [tracked] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    return copy, env, tracked


def test_served_and_promoted_model_answers_like_the_pipeline(trained, tmp_path):
    project, env, tracked = trained
    pipeline_classes = np.load(project / "data/predictions/test_probabilities.npy")[:20].argmax(axis=1)
    log = tmp_path / "serve.log"
    assert list(served_classes(project, env, 20, log=log)) == list(pipeline_classes)  # the latest run
    assert "━" not in log.read_text() and "/step" not in log.read_text(), "a Keras progress bar per request"

    promoted = run(project, [*MAKE, "promote", f"RUN={tracked.info.run_id}"], env)
    assert "mnist-classifier version 1, alias @champion" in promoted.stderr
    assert "WARNING" not in promoted.stderr and "has no artifacts" not in promoted.stderr, promoted.stderr
    version = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert version.run_id == tracked.info.run_id
    # The version carries its evidence: accuracy and a link to its run, commit, data, numeric environment.
    accuracy = tracked.data.metrics["test_accuracy"]
    assert f"Test accuracy **{accuracy:.2%}**" in version.description
    assert f"(#/experiments/{tracked.info.experiment_id}/runs/{tracked.info.run_id})" in version.description
    for key in ("git.commit", "data.hash", "numerics.onednn", "numerics.tensorflow.version"):
        assert version.tags[key] == tracked.data.tags[key]
    assert version.tags["test_accuracy"] == f"{accuracy:.4f}"
    by_alias = served_classes(project, env, 20, MODEL="models:/mnist-classifier@champion")
    assert list(by_alias) == list(pipeline_classes)


def test_promote_without_a_run_is_one_line(trained):
    project, env, _ = trained
    result = run(project, [*MAKE, "promote"], env, check=False)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        "error: promote: name the run to promote: `make promote RUN=<run id>` (`make ui` lists them)"
    ]


def test_serve_and_promote_mistakes_are_one_line_and_start_nothing(trained):
    project, env, tracked = trained
    [logged] = mlflow.search_logged_models(experiment_ids=[tracked.info.experiment_id], output_format="list")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        cases = [  # (make's arguments, the environment's changes, the start of the one line)
            (
                ["MODEL=models:/mnist-classifier@champion"],
                {},
                "no model to load at models:/mnist-classifier@champion (Registered Model with name=mnist-classifier "
                "not found); serve a finished training run's model",
            ),
            (
                [f"PORT={busy}"],
                {},
                f"cannot serve the model on 127.0.0.1:{busy} (Address already in use); stop what uses the port "
                f"(another `make serve`?) or choose another: `make serve PORT={busy + 1}`",
            ),
            (["PORT=99999"], {}, "PORT must be between 1 and 65535, got 99999"),
            ([], {"MLFLOW_TRACKING_URI": "foo"}, "MLFLOW_TRACKING_URI=foo is not a tracking store this project can"),
        ]
        for arguments, changes, expected in cases:
            result = run(project, [*MAKE, "serve", *arguments], {**env, **changes}, check=False, timeout=120)
            [line] = error_lines(result.stderr)
            assert line.startswith(f"error: serve: {expected}"), line
    # A model whose files are gone from the artifact store is neither served nor promoted.
    shutil.rmtree(Path(logged.artifact_location.removeprefix("file://")))
    for target in ("serve", "promote"):
        result = run(project, [*MAKE, target, f"RUN={tracked.info.run_id}"], env, check=False, timeout=120)
        [line] = error_lines(result.stderr)
        assert line.startswith(f"error: {target}: no model to load at models:/{logged.model_id} (No such artifact")
    assert mlflow.search_registered_models() == []  # no alias points at a model that cannot load


def test_the_data_splits_are_mlflow_datasets(trained):
    project, _, tracked = trained
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    inputs = mlflow.get_run(tracked.info.run_id).inputs.dataset_inputs
    by_context = {next(tag.value for tag in item.tags if tag.key == "mlflow.data.context"): item for item in inputs}
    assert sorted(by_context) == ["test", "train", "validation"]
    for split, item in by_context.items():
        assert item.dataset.name == f"mnist-{split}"
        # The digest identifies the split's exact content: its images and labels as stage outputs.
        content = hashlib.sha256()
        for kind in ("images", "labels"):
            content.update(np.load(project / f"data/prepared/{split}_{kind}.npy", allow_pickle=False))
        assert content.hexdigest().startswith(item.dataset.digest) and len(item.dataset.digest) == 16
        assert {tag.key: tag.value for tag in item.tags}["data.hash"] == manifest["data_hash"]
