"""Stage 5, error-analysis: where the model goes wrong on the test set, as tables and pictures.

Reads the test probabilities evaluate wrote, so it needs no TensorFlow.
"""

import sys

import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from pipeline import tracking
from pipeline.config import ErrorAnalysisConfig, run_stage
from pipeline.data_io import (
    CURVES_FILE,
    DIGITS,
    METRICS_FILE,
    NUM_CLASSES,
    PREDICTIONS_FILE,
    REPORTS_DIR,
    load_array,
    load_split,
    pyplot,
    save_figure,
    staged_outputs,
    write_csv,
)
from pipeline.errors import PipelineError

OUTPUT_DIR = REPORTS_DIR / "error_analysis"
PER_CLASS_FILE = OUTPUT_DIR / "per_class.csv"
CONFUSION_CSV = OUTPUT_DIR / "confusion_matrix.csv"
CONFUSION_PNG = OUTPUT_DIR / "confusion_matrix.png"
PREDICTIONS_CSV = OUTPUT_DIR / "predictions.csv"
PAIRS_FILE = OUTPUT_DIR / "confused_pairs.csv"
GALLERY_FILE = OUTPUT_DIR / "misclassified.png"


def error_analysis(config: ErrorAnalysisConfig) -> None:
    test_images, test_labels = load_split("test")
    probabilities = load_array(PREDICTIONS_FILE, "float32", (None, NUM_CLASSES))
    if len(probabilities) != len(test_labels):
        raise PipelineError(
            f"{PREDICTIONS_FILE} has {len(probabilities)} rows for {len(test_labels)} test "
            "images; rerun evaluate with `dvc repro`"
        )
    labels = np.asarray(test_labels).astype(int)
    predictions = probabilities.argmax(axis=1)
    confidences = probabilities.max(axis=1)
    matrix = confusion_matrix(labels, predictions, labels=DIGITS)

    support = matrix.sum(axis=1)
    correct = np.diag(matrix)
    per_class = pd.DataFrame(
        {
            "digit": DIGITS,
            "support": support,
            "correct": correct,
            "accuracy": np.divide(correct, support, out=np.zeros(NUM_CLASSES), where=support > 0),
        }
    )
    per_class["error_rate"] = 1 - per_class.accuracy
    # Logged first, landed after: a store that fails leaves the previous outputs as they were.
    with staged_outputs() as staged, tracking.model_run() as run:
        write_csv(staged / PER_CLASS_FILE, per_class)
        write_csv(
            staged / CONFUSION_CSV,
            pd.DataFrame(
                matrix, index=pd.Index(DIGITS, name="true"), columns=[f"predicted_{digit}" for digit in DIGITS]
            ),
            index=True,
        )
        # One row per test image: what DVC's confusion-matrix plot template reads.
        write_csv(staged / PREDICTIONS_CSV, pd.DataFrame({"actual": labels, "predicted": predictions}))
        write_csv(staged / PAIRS_FILE, confused_pairs(matrix, config.top_confused_pairs))
        save_figure(confusion_matrix_figure(matrix), staged / CONFUSION_PNG)
        save_figure(
            gallery_figure(test_images, labels, predictions, confidences, config.gallery_size), staged / GALLERY_FILE
        )
        tracking.log_artifacts(
            [staged / path for path in (PER_CLASS_FILE, CONFUSION_CSV, CONFUSION_PNG, PAIRS_FILE, GALLERY_FILE)],
            "error_analysis",
        )
    worst = per_class.sort_values("accuracy").iloc[0]
    print(
        f"error-analysis: {int(support.sum() - correct.sum())} errors; weakest digit {int(worst.digit)} "
        f"({worst.accuracy:.2%})",
        file=sys.stderr,
    )
    # The last stage: say where everything landed.
    print(
        f"\nResults: test accuracy {correct.sum() / support.sum():.2%} in {METRICS_FILE} (`dvc metrics show`)\n"
        f"Pictures: {CURVES_FILE}, {CONFUSION_PNG}, {GALLERY_FILE} (`dvc plots show` renders them all)\n"
        f"MLflow run {run.info.run_id} in {tracking.tracking_uri()}: `make ui` prints the link to it",
        file=sys.stderr,
    )


def confused_pairs(matrix: np.ndarray, top: int) -> pd.DataFrame:
    """(true, predicted) pairs ranked by how often the model confuses them."""
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    true, predicted = np.unravel_index(np.argsort(-off_diagonal, axis=None, kind="stable"), matrix.shape)
    pairs = pd.DataFrame({"true": true, "predicted": predicted, "count": off_diagonal[true, predicted]})
    pairs = pairs[pairs["count"] > 0].head(top)
    pairs["share_of_true_digit"] = pairs["count"] / np.maximum(matrix.sum(axis=1)[pairs.true], 1)
    return pairs.reset_index(drop=True)


def confusion_matrix_figure(matrix: np.ndarray):
    figure, axes = pyplot().subplots(figsize=(7, 6), layout="tight")
    ConfusionMatrixDisplay(matrix, display_labels=DIGITS).plot(ax=axes, cmap="Blues", colorbar=False)
    axes.set_title("Confusion matrix, test set")
    return figure


def gallery_figure(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, confidences: np.ndarray, size: int):
    """The misclassified digits, most confident mistakes first, each under its caption.

    One axes holds every digit, placed by its extent: a grid of subplots draws the same picture more
    slowly (matplotlib lays out ticks that are never shown), and one image of all digits resampled at
    once takes more memory.
    """
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-confidences[wrong], kind="stable")][:size]
    columns, side = 6, images.shape[1]
    rows = max(1, -(-len(wrong) // columns))
    cell_width, cell_height = side + 4, side + 10  # in image pixels: a margin, and room for the caption
    pixels_per_inch, title_inches = 20, 0.4  # a digit's 28 pixels over 1.4 inches
    height = rows * cell_height / pixels_per_inch
    figure = pyplot().figure(figsize=(columns * cell_width / pixels_per_inch, height + title_inches))
    axes = figure.add_axes((0, 0, 1, height / (height + title_inches)))
    axes.set_axis_off()
    for position, index in enumerate(wrong):
        row, column = divmod(position, columns)
        top, left = row * cell_height + cell_height - side - 1, column * cell_width + 2
        axes.imshow(
            images[index],
            cmap="gray_r",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(left, left + side, top + side, top),
        )
        axes.text(
            left + side / 2,
            top - 1,
            f"true {labels[index]} / pred {predictions[index]}\n{confidences[index]:.0%}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes.set(xlim=(0, columns * cell_width), ylim=(rows * cell_height, 0), aspect="equal")
    figure.suptitle(f"Misclassified test digits ({len(wrong)} most confident of {int((predictions != labels).sum())})")
    return figure


if __name__ == "__main__":
    run_stage(error_analysis, "error_analysis")
