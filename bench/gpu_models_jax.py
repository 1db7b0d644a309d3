"""The project's models on a GPU through Keras's JAX backend: time to 99% test accuracy.

For a GPU machine whose Python has JAX but no GPU TensorFlow: not the train stage, which needs
TensorFlow, but the same model builder (pipeline/models.py) with the CNN as its log was recorded
(two convolutions per block, no random shifts, a constant learning rate), the same optimizer,
learning rate and batch size, trained epoch by epoch with the test
accuracy measured after each. `bench/gpu.sh` is the train-stage benchmark for a TensorFlow GPU.

    python bench/gpu_models_jax.py MNIST_DIR [filters ...]    # MNIST_DIR: the four *-ubyte.gz files

Prints one JSON line per epoch and a summary line; time counts fit() only, the first epoch
including JAX's compilation.
"""

import gzip
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.data_io import parse_idx  # noqa: E402
from pipeline.models import build_model  # noqa: E402

# The train stage's defaults; the environment may change them for a quick look.
EPOCHS = int(os.environ.get("EPOCHS", 12))
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", 64))
LEARNING_RATE = float(os.environ.get("LEARNING_RATE", 0.001))
STEPS_PER_EXECUTION = int(os.environ.get("STEPS_PER_EXECUTION", 10))
TARGET = 0.99


def load(folder: Path, name: str) -> np.ndarray:
    return parse_idx(gzip.decompress((folder / f"{name}.gz").read_bytes()), name)


def main() -> None:
    folder, filters = Path(sys.argv[1]), [int(value) for value in sys.argv[2:]] or [16, 32]
    train_images = load(folder, "train-images-idx3-ubyte").astype(np.float32) / np.float32(255)
    train_labels = load(folder, "train-labels-idx1-ubyte")
    test_images = load(folder, "t10k-images-idx3-ubyte").astype(np.float32) / np.float32(255)
    test_labels = load(folder, "t10k-labels-idx1-ubyte")
    keras.utils.set_random_seed(0)
    model = build_model(
        SimpleNamespace(name="cnn", filters=filters, convs_per_block=2, dense_units=128, dropout=0.25, random_shift=0.0)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
        jit_compile=True,
    )
    device = str(keras.distribution.list_devices()[0])
    trained_seconds, reached = 0.0, None
    for epoch in range(1, EPOCHS + 1):
        started = time.perf_counter()
        model.fit(train_images, train_labels, batch_size=BATCH_SIZE, epochs=1, verbose=0)
        trained_seconds += time.perf_counter() - started
        _, accuracy = model.evaluate(test_images, test_labels, batch_size=1024, verbose=0)
        print(json.dumps({"epoch": epoch, "trained_seconds": round(trained_seconds, 2), "test_accuracy": accuracy}))
        if reached is None and accuracy >= TARGET:
            reached = {"epoch": epoch, "trained_seconds": round(trained_seconds, 2)}
    print(
        json.dumps(
            {
                "summary": True,
                "device": device,
                "filters": filters,
                "batch_size": BATCH_SIZE,
                "learning_rate": LEARNING_RATE,
                "time_to_99": reached,
                "backend": keras.backend.backend(),
                "keras": keras.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
