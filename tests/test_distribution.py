"""Device options on the CPU: MirroredStrategy over two logical devices, and mixed precision."""

import json

import mlflow
import pytest

from tests.helpers import TINY, environment, make_project, run


def train_and_evaluate(project, env) -> tuple[dict, mlflow.entities.Run]:
    run(project, ["dvc", "repro", "evaluate"], env)
    return results(project)


def results(project) -> tuple[dict, mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [tracked] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    return json.loads((project / "reports/metrics.json").read_text()), tracked


@pytest.mark.slow
def test_mirrored_on_two_devices_matches_one_device(tmp_path, pipeline_run):
    """Against the shared tiny run: one device, batches of 64."""
    single, env, _ = pipeline_run
    mirrored = make_project(
        tmp_path / "mirrored",
        [
            *TINY,
            "train.batch_size=32",
            "train.distribution=mirrored",
            "train.replicas=2",
            "train.steps_per_execution=1",
        ],
    )
    single_metrics, single_run = results(single)
    mirrored_metrics, mirrored_run = train_and_evaluate(mirrored, env)

    assert single_run.data.params["train.batch_size"] == "64"
    assert single_run.data.tags["train.replicas_in_sync"] == "1"
    assert mirrored_run.data.tags["train.replicas_in_sync"] == "2"
    assert mirrored_run.data.params["train.distribution"] == "mirrored"
    # batch_size is per replica: two replicas of 32 make the same 64-sample updates as one device,
    # on the same batches, so only the summation order differs.
    assert mirrored_run.data.metrics["val_accuracy"] == pytest.approx(single_run.data.metrics["val_accuracy"], abs=0.02)
    assert mirrored_metrics["test_accuracy"] == pytest.approx(single_metrics["test_accuracy"], abs=0.02)
    assert mirrored_metrics["test_accuracy"] > 0.5  # it learned (chance is 0.1)


@pytest.mark.slow
def test_mixed_precision_computes_in_float16_and_keeps_float32_probabilities(tmp_path, mnist_url):
    """train.mixed_precision on the CPU (slow there, but the same code path as on a GPU)."""
    import keras

    project = make_project(tmp_path, [*TINY, "train.mixed_precision=true"])
    metrics, tracked = train_and_evaluate(project, environment(mnist_url))
    assert tracked.data.params["train.mixed_precision"] == "True"
    model = keras.models.load_model(project / "models/model.keras", compile=False, safe_mode=True)
    hidden, output = model.layers[-2], model.layers[-1]
    assert hidden.dtype_policy.name == "mixed_float16" and hidden.kernel.dtype == "float32"
    assert output.dtype_policy.name == "float32"  # softmax kept in float32 (pipeline/models.py)
    assert metrics["test_accuracy"] > 0.5
