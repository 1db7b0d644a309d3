"""The plain script a user would otherwise write: the reference the train stage is timed against.

Loads MNIST (the IDX files in data/raw), flattens to 784 floats in [0, 1], one-hot labels,
Sequential([Dense(512, relu), Dense(10, softmax)]), Adam, fit(epochs=5, batch_size=64), evaluate.
--epochs and --limit (the first N training and test images) give the quick experiment's twin.
Prints one JSON line: fit_seconds, total_seconds, test_accuracy.
"""

import time

started = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

RAW = Path("data/raw")
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--limit", type=int, default=None)
arguments = parser.parse_args()


def load(name: str, header: int) -> np.ndarray:
    return np.frombuffer((RAW / name).read_bytes(), dtype=np.uint8, offset=header)


x_train = load("train-images-idx3-ubyte", 16).reshape(-1, 784).astype("float32")[: arguments.limit] / 255
y_train = keras.utils.to_categorical(load("train-labels-idx1-ubyte", 8), 10)[: arguments.limit]
x_test = load("t10k-images-idx3-ubyte", 16).reshape(-1, 784).astype("float32")[: arguments.limit] / 255
y_test = keras.utils.to_categorical(load("t10k-labels-idx1-ubyte", 8), 10)[: arguments.limit]

model = keras.Sequential(
    [
        keras.Input(shape=(784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
fit_started = time.perf_counter()
model.fit(x_train, y_train, epochs=arguments.epochs, batch_size=64, verbose=0)
fit_seconds = time.perf_counter() - fit_started
_, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
print(
    json.dumps(
        {"fit_seconds": fit_seconds, "total_seconds": time.perf_counter() - started, "test_accuracy": test_accuracy}
    )
)
