"""The train stage's parts: fused kernels (Keras's Adam and BatchNormalization, each one TensorFlow
kernel), run names, logged figures and the checkpoint a killed training resumes from."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import compose, training_params, validate
from pipeline.errors import PipelineError
from pipeline.train import (
    CHECKPOINT_NAME,
    EpochCheckpoint,
    as_float32_decimal,
    fused_adam,
    resume,
    run_name,
    with_fused_batch_normalization,
)


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
    for ours, theirs in zip(fused, plain, strict=True):
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


def after_a_training_call(fused: bool) -> tuple[list[np.ndarray], set[str]]:
    """A batch norm layer's output, gradients (input, scale, offset) and moving statistics after one
    training call on images of 3 channels, and the op types of that call's graph."""
    layer = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((5, 5, 3)), layer])
    if fused:
        with_fused_batch_normalization(model)
    images = tf.constant(np.random.default_rng(0).normal(2, 3, size=(8, 5, 5, 3)).astype("float32"))
    weights = tf.constant(np.random.default_rng(1).normal(size=(8, 5, 5, 3)).astype("float32"))

    @tf.function
    def training_call(images):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = model(images, training=True)
            loss = tf.reduce_sum(outputs * weights)  # weighted: the gradient of a plain sum is ~0
        return [outputs, *tape.gradient(loss, [images, *layer.trainable_variables])]

    values = [tensor.numpy() for tensor in training_call(images)]
    operations = {operation.type for operation in training_call.get_concrete_function(images).graph.get_operations()}
    return [*values, layer.moving_mean.numpy(), layer.moving_variance.numpy()], operations


def test_fused_batch_normalization_computes_keras_batch_normalization():
    """The kernel ran (it is in the graph), and output, gradients and moving statistics are Keras's
    up to float32 rounding; the unbiased variance the kernel returns would be 1/199 off."""
    (fused, fused_operations), (plain, plain_operations) = after_a_training_call(True), after_a_training_call(False)
    assert "FusedBatchNormV3" in fused_operations and "FusedBatchNormV3" not in plain_operations
    assert not np.allclose(plain[-1], 1)  # the moving variance did move
    for ours, theirs in zip(fused, plain, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_model_with_it_saves_plain_batch_normalization(tmp_path):
    """Inference is Keras's own call, and the saved layer is Keras's: the loaded model predicts the same."""
    model = with_fused_batch_normalization(
        keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization()])
    )
    model.compile(optimizer="adam", loss="mse")
    images = np.random.default_rng(0).normal(size=(16, 4, 4, 2)).astype("float32")
    model.fit(images, images, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert "call" in vars(model.layers[0]) and "call" not in vars(loaded.layers[0])
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ([], "default-seed0"),
        (["+experiment=lr_x10", "train.seed=2"], "lr_x10-seed2"),
        (["data.limit=1000"], "default-limit=1000-seed0"),
        (["+experiment=cnn", "train.epochs=3"], "cnn-epochs=3-seed0"),
        # The closest preset: tuned differs in the learning rate alone, the default also in the batch size.
        (["train.learning_rate=0.002", "train.batch_size=32"], "tuned-learning_rate=0.002-seed0"),
    ],
)
def test_run_names_say_the_setting_what_differs_and_the_seed(overrides, name):
    """As `dvc exp run -S ...` composes conf/: the run's name whatever DVC called the experiment."""
    assert run_name(training_params(validate(compose(overrides)))) == name


@pytest.mark.parametrize("value", [0.9756, 0.1, 1 / 3, 0.975600004196167])
def test_keras_float32_metrics_are_logged_as_their_shortest_decimal(value):
    logged = as_float32_decimal(float(np.float32(value)))  # what Keras hands over: a float32 widened
    assert np.float32(logged) == np.float32(value) and repr(logged) == str(np.float32(value))


def tiny_model(units: int = 3) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation="softmax")])
    model.compile(optimizer=fused_adam(0.01), loss="sparse_categorical_crossentropy")
    return model


def checkpoint_of_a_fitted_model(folder, units: int = 3) -> keras.Model:
    """Fits a tiny model for two steps and checkpoints it into folder, as after an epoch."""
    model = tiny_model(units)
    model.fit(np.ones((8, 4), "float32"), np.zeros(8, "int32"), batch_size=4, verbose=0)
    checkpoint = EpochCheckpoint(folder)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0)
    return model


def test_a_checkpoint_restores_the_training_state_and_its_run(tmp_path):
    trained = checkpoint_of_a_fitted_model(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "abc"}))
    resumed = tiny_model()
    assert resume(resumed, tmp_path) == (2, "abc")  # two steps of 4
    for ours, theirs in zip(resumed.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert resume(tiny_model(), tmp_path / "none") == (0, None)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda folder: os.truncate(folder / CHECKPOINT_NAME, 100), "File is not a zip file"),
        (lambda folder: (folder / "run.json").write_text("{}"), "'run_id'"),
        (lambda folder: (folder / "run.json").unlink(), "No such file or directory"),
        (lambda folder: checkpoint_of_a_fitted_model(folder, units=5), "do not fit the model's"),
    ],
    ids=["truncated", "no-run-id", "no-run-file", "other-model"],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_fix(tmp_path, damage, reason):
    checkpoint_of_a_fitted_model(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "abc"}))
    damage(tmp_path)
    with pytest.raises(PipelineError) as raised:
        resume(tiny_model(), tmp_path)
    assert str(raised.value).startswith(f"the checkpoint of an interrupted training in {tmp_path} is damaged (")
    assert reason in str(raised.value)
    assert str(raised.value).endswith(
        f"; delete it (`rm -r {tmp_path}`) and run again: the training starts over from epoch 1"
    )
