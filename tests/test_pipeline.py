"""End to end: `dvc repro` of all five stages on a tiny config, checked as a user would."""

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.helpers import SECRET, git, run

pytestmark = pytest.mark.slow  # every test here runs the pipeline end to end

METRIC_KEYS = {"test_accuracy", "test_loss", "precision_macro", "recall_macro", "f1_macro", "roc_auc_ovr"}


@pytest.fixture(scope="module")
def tracked_run(pipeline_run):
    project, _, _ = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert len(runs) == 1, "one pipeline run must give exactly one MLflow run"
    return runs[0]


def test_all_five_stages_ran(pipeline_run):
    _, _, result = pipeline_run
    for stage in ("download", "preprocess", "train", "evaluate", "error-analysis"):
        assert f"Running stage '{stage}'" in result.stdout


def test_outputs_and_metrics(pipeline_run):
    project, _, _ = pipeline_run
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert 0.5 < metrics["test_accuracy"] <= 1.0, "even 300 images and one epoch beat chance by far"
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert {split: manifest["splits"][split]["count"] for split in manifest["splits"]} == {
        "train": 300,
        "validation": 300,
        "test": 300,
    }
    images = np.load(project / "data/prepared/train_images.npy", allow_pickle=False)
    assert images.dtype == np.float32 and images.shape == (300, 28, 28)
    assert 0.0 == images.min() and images.max() == 1.0

    per_class = pd.read_csv(project / "reports/error_analysis/per_class.csv")
    assert list(per_class.columns) == ["digit", "support", "correct", "accuracy", "error_rate"]
    assert per_class.support.sum() == 300
    assert per_class.correct.sum() / 300 == pytest.approx(metrics["test_accuracy"])
    pairs = pd.read_csv(project / "reports/error_analysis/confused_pairs.csv")
    assert list(pairs["count"]) == sorted(pairs["count"], reverse=True)
    for picture in (
        "reports/error_analysis/confusion_matrix.png",
        "reports/error_analysis/misclassified.png",
        "reports/training_curves.png",
    ):
        assert (project / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_sees_metrics_and_plots(trained_copy):
    project, env = trained_copy
    shown = json.loads(run(project, ["dvc", "metrics", "show", "--json"], env).stdout)
    assert shown[""]["data"]["reports/metrics.json"]["data"]["test_accuracy"] > 0.5
    plots = json.loads(run(project, ["dvc", "plots", "show", "--json"], env).stdout)["data"]
    accuracy = plots["Accuracy per epoch"][0]["content"]["data"]["values"]
    assert {point["field"] for point in accuracy} == {"accuracy", "val_accuracy"}
    assert [point["epoch"] for point in accuracy if point["field"] == "accuracy"] == ["1"]
    confusion = plots["Confusion matrix (test set)"][0]["content"]["data"]["values"]
    assert len(confusion) == 300 and {"actual", "predicted"} <= confusion[0].keys()
    for picture in (
        "reports/training_curves.png",
        "reports/error_analysis/confusion_matrix.png",
        "reports/error_analysis/misclassified.png",
    ):
        [image] = plots[picture]
        assert image["type"] == "image" and Path(image["url"]).read_bytes()[:4] == b"\x89PNG"


def test_mlflow_run_is_complete(pipeline_run, tracked_run):
    project, _, _ = pipeline_run
    run_id = tracked_run.info.run_id
    assert json.loads((project / "models/run.json").read_text())["run_id"] == run_id
    assert tracked_run.info.status == "FINISHED"
    params = tracked_run.data.params
    assert params["model.name"] == "mlp" and params["model.hidden_units"] == "512"
    assert params["train.learning_rate"] == "0.001" and params["train.batch_size"] == "64"
    assert params["train.epochs"] == "1" and params["data.limit"] == "300"
    metrics = tracked_run.data.metrics
    assert metrics["test_accuracy"] == json.loads((project / "reports/metrics.json").read_text())["test_accuracy"]
    assert any(key.startswith("system/cpu_utilization") for key in metrics)

    client = mlflow.MlflowClient()
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second"):
        assert [point.step for point in client.get_metric_history(run_id, metric)] == [1]  # epoch 1 of 1

    tags = tracked_run.data.tags
    assert tags["git.commit"] == git(project, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert tags["data.hash"] == manifest["data_hash"]
    assert len(tags["config.hash"]) == 16

    artifacts = {
        item.path
        for folder in ("training", "evaluation", "error_analysis")
        for item in client.list_artifacts(run_id, folder)
    }
    assert {
        "evaluation/metrics.json",
        "error_analysis/per_class.csv",
        "error_analysis/misclassified.png",
        "error_analysis/confusion_matrix.png",
        "training/training_curves.png",
    } <= artifacts


def test_no_environment_value_is_logged(tracked_run):
    client = mlflow.MlflowClient()
    logged = [
        *tracked_run.data.params.values(),
        *tracked_run.data.tags.values(),
        Path(client.download_artifacts(tracked_run.info.run_id, "environment/requirements.txt")).read_text(),
    ]
    assert not any(SECRET in value for value in logged)


def test_logged_model_loads_and_predicts(pipeline_run, tracked_run):
    project, _, _ = pipeline_run
    models = mlflow.search_logged_models(experiment_ids=[tracked_run.info.experiment_id], output_format="list")
    assert [model.source_run_id for model in models] == [tracked_run.info.run_id]
    loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    assert loaded.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28)
    images = np.load(project / "data/prepared/test_images.npy")[:20]
    labels = np.load(project / "data/prepared/test_labels.npy")[:20]
    probabilities = np.asarray(loaded.predict(images))
    assert probabilities.shape == (20, 10)
    local = keras.models.load_model(project / "models/model.keras", safe_mode=True)
    np.testing.assert_allclose(probabilities, local.predict(images, verbose=0), rtol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.5


def test_second_repro_does_no_work(trained_copy):
    project, env = trained_copy
    again = run(project, ["dvc", "repro"], env)
    assert "Running stage" not in again.stdout
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    assert len(mlflow.search_runs(experiment_names=["mnist"], output_format="list")) == 1


def test_the_ui_opens_on_training_runs_that_read_well(pipeline_run, tracked_run):
    """What MLflow's UI shows, checked through its API: the experiment's kind and saved view, the run's
    name, epochs as steps 1..N, Keras's float32 values as their own decimals."""
    project, _, _ = pipeline_run
    experiment = mlflow.get_experiment(tracked_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.training-runs"])
    state = json.loads(view["state"])
    assert view["name"] == "Training runs"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`test_accuracy`", False)
    assert state["selectedColumns"][0] == "metrics.`test_accuracy`"
    assert {"params.`data.limit`", "params.`train.learning_rate`", "params.`train.seed`"} <= set(
        state["selectedColumns"]
    )
    shown = [chart for chart in state["compareRunCharts"] if not chart["deleted"]]
    assert {tuple(chart.get("selectedMetricKeys", ())) for chart in shown} >= {
        ("accuracy", "val_accuracy"),
        ("loss", "val_loss"),
    }
    # Every model metric has a card, so the UI adds none of its own: the shown ones are all there is.
    charted = {chart.get("metricKey") for chart in state["compareRunCharts"]}
    assert {key for key in tracked_run.data.metrics if not key.startswith("system/")} <= charted
    assert len(shown) <= 6

    # The tiny config differs from conf/ in data.limit and train.epochs (TINY).
    assert tracked_run.info.run_name == "default-limit=300-epochs=1-seed0"

    history = pd.read_csv(project / "reports/training_history.csv")
    assert list(history.epoch) == [1]
    for metric in ("accuracy", "val_accuracy", "loss", "val_loss"):
        value = tracked_run.data.metrics[metric]
        assert value == float(str(np.float32(value))), f"{metric} {value!r} is not its float32's shortest decimal"
        assert history[metric].iloc[-1] == value
