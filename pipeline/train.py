"""Stage 3, train: fit the configured model on the training split, tracked in one MLflow run.

Deterministic on CPU: the same config, seed, data, code and environment give bit-identical weights
(`set_random_seed` alone is not enough; op determinism is needed too).
"""

import os
import sys
import time

import keras
import matplotlib
import mlflow
import mlflow.keras
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline import tracking
from pipeline.config import CnnConfig, DataConfig, MlpConfig, TrainConfig, config_hash, run_stage, training_params
from pipeline.data_io import (MODEL_FILE, PREPARED_DIR, REPORTS_DIR, atomic_path, load_split, read_json,
                              save_figure, write_csv)
from pipeline.models import IMAGE_SHAPE, NUM_CLASSES, build_model

matplotlib.use("Agg")  # no display needed: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HISTORY_FILE = REPORTS_DIR / "training_history.csv"
CURVES_FILE = REPORTS_DIR / "training_curves.png"
VALIDATION_BATCH_SIZE = 1024  # evaluation only: changes no update, just the speed
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None):
    """In-memory tensors through tf.data: on small models Keras's numpy adapter costs more per
    step than the step's arithmetic. A full, seeded reshuffle every epoch, as fit(shuffle=True)."""
    data = tf.data.Dataset.from_tensor_slices((np.asarray(images), np.asarray(labels)))
    if shuffle_seed is not None:
        data = data.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's losses, accuracies, duration and throughput to the active MLflow run."""

    def __init__(self, samples_per_epoch: int):
        super().__init__()
        self.samples_per_epoch = samples_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        mlflow.log_metrics({**logs, "epoch_seconds": seconds,
                            "samples_per_second": self.samples_per_epoch / seconds}, step=epoch)


def train(model_config: MlpConfig | CnnConfig, train_config: TrainConfig) -> None:
    keras.utils.set_random_seed(train_config.seed)
    tf.config.experimental.enable_op_determinism()

    train_images, train_labels = load_split("train")
    validation_images, validation_labels = load_split("validation")
    manifest = read_json(PREPARED_DIR / "manifest.json")

    model = build_model(model_config)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=train_config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=train_config.steps_per_execution,
        jit_compile=train_config.jit_compile,
    )

    # The data section comes from the manifest: it is what preprocess actually used.
    data_config = DataConfig(**manifest["config"])
    params = training_params({"data": data_config, "model": model_config, "train": train_config})
    gpus = tf.config.list_physical_devices("GPU")
    tags = {
        "data.hash": manifest["data_hash"],
        "config.hash": config_hash(params),
        # Runs of one setting with different seeds share this: `make compare` groups by it.
        "config.hash_without_seed": config_hash(params, ignore=("train.seed",)),
        "model.name": model_config.name,
        "tensorflow.version": tf.__version__,
        "tensorflow.build": "CUDA" if tf.test.is_built_with_cuda() else "CPU",
        "tensorflow.device": "GPU" if gpus else "CPU",
    }
    if gpus:
        tags["env.gpu"] = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "unknown")
    if os.environ.get("PIPELINE_SWEEP"):
        tags["sweep"] = os.environ["PIPELINE_SWEEP"]
    # A DVC experiment's name (`make sweep` names them `lr_x10-seed0`) is the readable choice.
    run_name = os.environ.get("DVC_EXP_NAME") or (
        f"{model_config.name}-lr{train_config.learning_rate:g}-bs{train_config.batch_size}"
        f"-ep{train_config.epochs}-seed{train_config.seed}")
    with tracking.training_run(run_name, params, tags):
        started = time.perf_counter()
        history = model.fit(
            batches(train_images, train_labels, train_config.batch_size, shuffle_seed=train_config.seed),
            epochs=train_config.epochs,
            validation_data=batches(validation_images, validation_labels, VALIDATION_BATCH_SIZE),
            callbacks=[EpochLogger(len(train_labels))],
            verbose=2,
        )
        mlflow.log_metric("fit_seconds", time.perf_counter() - started)

        with atomic_path(MODEL_FILE) as temporary:
            model.save(temporary)
        # Explicit requirements: inferring them costs seconds and adds nothing here.
        mlflow.keras.log_model(model, name="model", signature=SIGNATURE,
                               pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"])
        write_history(history.history)
        tracking.log_artifacts([HISTORY_FILE, CURVES_FILE], "training")


def write_history(history: dict[str, list[float]]) -> None:
    table = pd.DataFrame(history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    write_csv(HISTORY_FILE, table)

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(table.epoch, table[metric], marker="o", label="training")
        axes.plot(table.epoch, table[f"val_{metric}"], marker="o", label="validation")
        axes.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, CURVES_FILE)
    print(f"train: wrote {HISTORY_FILE} and {CURVES_FILE}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(train, "model", "train")
