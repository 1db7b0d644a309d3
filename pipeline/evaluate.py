"""Stage 4, evaluate: the trained model on the official 10,000-image test set.

Writes reports/metrics.json (DVC metrics), the per-class classification report, and the test-set
probabilities that error-analysis reads (so that stage needs no TensorFlow).
"""

import json
import sys

import mlflow
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from pipeline import numerics, tracking
from pipeline.runtime import tensorflow_import_notices_hidden

with tensorflow_import_notices_hidden():
    import keras  # noqa: F401  (data_io.load_model's, imported here with TensorFlow's notices hidden)
from pipeline.config import PARAMS_FILE, EvaluateConfig, run_stage
from pipeline.data_io import (
    DIGITS,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    REPORTS_DIR,
    load_model,
    load_split,
    read_manifest,
    save_array,
    staged_outputs,
    write_json,
)
from pipeline.errors import PipelineError

REPORT_FILE = REPORTS_DIR / "classification_report.json"


def evaluate(config: EvaluateConfig) -> None:
    test_images, test_labels = load_split("test")
    model = load_model(MODEL_FILE, compile=False)  # predicting only
    probabilities = model.predict(test_images, batch_size=config.batch_size, verbose=0).astype(np.float64)
    if not np.isfinite(probabilities).all():
        raise PipelineError(
            f"{MODEL_FILE} predicts non-finite probabilities: its weights hold NaN or inf (a diverged "
            "training); lower train.learning_rate and retrain with `dvc repro --force train`"
        )
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 softmax sums drift from 1
    metrics, report = score(np.asarray(test_labels), probabilities)

    # Logged first, landed after: a store that fails leaves the previous outputs as they were.
    with staged_outputs() as staged, tracking.model_run():
        save_array(staged / PREDICTIONS_FILE, probabilities.astype(np.float32))
        write_json(staged / METRICS_FILE, metrics)
        write_json(staged / REPORT_FILE, report)
        mlflow.log_metrics({key: value for key, value in metrics.items() if value is not None})
        tracking.log_dataset("test", test_images, test_labels, read_manifest())
        tracking.log_artifacts([staged / METRICS_FILE, staged / REPORT_FILE], "evaluation")
    print(f"evaluate: test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}", file=sys.stderr)
    explain_difference_from_commit(metrics)


def explain_difference_from_commit(metrics: dict) -> None:
    """Says why reports/metrics.json now differs from the commit's, when the params are the commit's.

    The usual reason is another numeric environment (CPU instruction set, threads, oneDNN): the
    same code and config then give slightly different weights, and `git status` shows the change.
    """
    import yaml

    committed_params, committed_metrics = (tracking.git("show", f"HEAD:{path}") for path in (PARAMS_FILE, METRICS_FILE))
    if (
        not committed_params
        or not committed_metrics
        or yaml.safe_load(committed_params) != yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
        or json.loads(committed_metrics) == metrics
    ):
        return  # nothing committed to compare with, another configuration, or the same result
    reference = json.loads(tracking.git("show", f"HEAD:{numerics.NUMERICS_FILE}") or "null")
    here = json.loads(numerics.NUMERICS_FILE.read_text()) if numerics.NUMERICS_FILE.exists() else None
    differing = (
        numerics.differences(reference, here) if reference and here else ["the commit records no numeric environment"]
    )
    committed = json.loads(committed_metrics)
    moved = ", ".join(
        f"{key} {metrics[key]:.10g} (committed {committed.get(key, float('nan')):.10g})"
        for key in sorted(metrics)
        if metrics[key] != committed.get(key) and metrics[key] is not None
    )
    if differing:
        print(
            f"evaluate: note: {moved}: this machine's numeric environment differs from the one that made the "
            f"committed result ({'; '.join(differing)}), and the same code and config give slightly different "
            "weights there. `make reproduce REV=HEAD` checks the committed result within its tolerance",
            file=sys.stderr,
        )
    else:
        print(
            f"evaluate: note: {moved}, with the committed params in the same numeric environment: code, data or "
            "packages differ from the commit (see `git status` and `dvc status`)",
            file=sys.stderr,
        )


def score(labels: np.ndarray, probabilities: np.ndarray) -> tuple[dict, dict]:
    predictions = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=DIGITS, average="macro", zero_division=0
    )
    metrics = {
        "test_accuracy": accuracy_score(labels, predictions),
        "test_loss": log_loss(labels, probabilities, labels=DIGITS),
        "precision_macro": precision,
        "recall_macro": recall,
        "f1_macro": f1,
        # One-vs-rest needs every digit among the labels; tiny test subsets may lack one.
        "roc_auc_ovr": roc_auc_score(labels, probabilities, multi_class="ovr", labels=DIGITS)
        if len(np.unique(labels)) == len(DIGITS)
        else None,
    }
    report = classification_report(labels, predictions, labels=DIGITS, output_dict=True, zero_division=0)
    return {key: (None if value is None else float(value)) for key, value in metrics.items()}, report


if __name__ == "__main__":
    run_stage(evaluate, "evaluate")
