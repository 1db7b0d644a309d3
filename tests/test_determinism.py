"""The determinism contract: same config, seed, data, code and environment -> identical weights (CPU)."""

import sys

import keras
import numpy as np
import pytest

from tests.helpers import environment, make_project, run


def train_weights(project, env) -> list[np.ndarray]:
    run(project, [sys.executable, "-m", "pipeline.train"], env)
    return keras.models.load_model(project / "models/model.keras", safe_mode=True).get_weights()


@pytest.mark.slow
def test_two_trainings_give_identical_weights(tmp_path, mnist_url):
    project = make_project(tmp_path)
    env = environment(mnist_url)
    run(project, ["dvc", "repro", "preprocess"], env)
    first, second = train_weights(project, env), train_weights(project, env)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
