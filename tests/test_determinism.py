"""The determinism contract: same config, seed, data, code and environment -> identical weights (CPU)."""

import sys

import keras
import numpy as np
import pytest

from tests.helpers import run


def weights(project) -> list[np.ndarray]:
    return keras.models.load_model(project / "models/model.keras", safe_mode=True).get_weights()


@pytest.mark.slow
def test_a_second_training_gives_identical_weights(pipeline_run, trained_copy):
    """The shared tiny run's training again, later, in another process and folder: the same weights."""
    project, env, _ = pipeline_run
    copy, _ = trained_copy
    run(copy, [sys.executable, "-m", "pipeline.train"], env)
    first, second = weights(project), weights(copy)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
