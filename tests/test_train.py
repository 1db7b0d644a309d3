"""The train stage's optimizer: Keras's Adam, each update one fused TensorFlow kernel."""

import keras
import numpy as np

from pipeline.train import fused_adam


def after_adam_steps(optimizer: keras.optimizers.Adam) -> list[np.ndarray]:
    """A variable and the optimizer's state after five updates with fixed gradients."""
    variable = keras.Variable(np.random.default_rng(0).normal(size=(30, 20)).astype("float32"))
    for gradient in np.random.default_rng(1).normal(size=(5, 30, 20)).astype("float32"):
        optimizer.apply([gradient], [variable])
    return [variable.numpy(), *(state.numpy() for state in optimizer.variables)]


def test_fused_adam_takes_keras_adams_steps():
    """Same formula, same variables (step count, moments): equal up to float32 rounding, which is
    far below one step (0.01): a wrong bias correction or epsilon would be off by about a step."""
    fused, plain = after_adam_steps(fused_adam(0.01)), after_adam_steps(keras.optimizers.Adam(0.01))
    assert len(fused) == len(plain) == 5  # the variable; step count, learning rate, first and second moments
    assert not np.allclose(fused[0], np.random.default_rng(0).normal(size=(30, 20)))  # it did move
    for ours, theirs in zip(fused, plain):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_model_trained_with_it_saves_a_plain_adam(tmp_path):
    """Nothing of the pipeline in the saved model: any Keras (and `mlflow models serve`) loads it."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=fused_adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(np.ones((8, 4), "float32"), np.zeros(8, "int32"), verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert type(loaded.optimizer) is keras.optimizers.Adam
    assert "update_step" not in vars(loaded.optimizer)  # Keras's own update, not the fused one
    assert int(loaded.optimizer.iterations.numpy()) == 1
