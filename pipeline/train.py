"""Stage 3, train: fit the configured model on the training split, tracked in one MLflow run.

Deterministic on CPU: the same config, seed, data, code and environment give bit-identical weights
(`set_random_seed` alone is not enough; op determinism is needed too).
"""

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import types
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline import project_root
from pipeline.runtime import skipped_optional_import, tensorflow_import_notices_hidden

# Keras imports scikit-learn, an optional dependency of its own, for its scikit-learn wrappers
# (keras/src/wrappers/fixes.py), which training never uses: half a second of every cold start.
with tensorflow_import_notices_hidden(), skipped_optional_import("sklearn"):
    import keras
    import mlflow.keras
    import tensorflow as tf

from pipeline import numerics, tracking  # noqa: E402
from pipeline.config import (
    CONF_DIR,
    SETTINGS,
    CnnConfig,
    DataConfig,
    MlpConfig,
    TrainConfig,
    compose,
    config_hash,
    run_stage,
    training_params,
    validate,
)
from pipeline.data_io import (
    CURVES_FILE,
    HISTORY_FILE,
    IMAGE_SHAPE,
    MODEL_FILE,
    NUM_CLASSES,
    RUN_FILE,
    TRAINING_INPUTS,
    StagedOutputs,
    atomic_path,
    load_split,
    pyplot,
    read_manifest,
    save_figure,
    staged_outputs,
    write_csv,
    write_json,
)
from pipeline.errors import PipelineError, raise_if_interrupted
from pipeline.models import build_model

VALIDATION_BATCH_SIZE = 1024  # evaluation only: changes no update, just the speed
CHECKPOINT_ROOT = Path(".train-checkpoints")
CHECKPOINT_NAME = "last-epoch.npz"
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)


def training_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int
) -> tf.data.Dataset:
    """Batches for epochs first_epoch..epochs-1, from in-memory tensors.

    Epoch e visits the images in an order fixed by (seed, e) alone, so a run resumed at epoch e
    sees exactly the batches an uninterrupted one would. tf.data rather than numpy arrays: on small
    models Keras's numpy adapter costs more per step than the step's arithmetic. Gathering a batch
    takes microseconds, so one map call at a time and a fixed prefetch: no autotuning (see
    without_autotuning).
    """
    images, labels = tf.constant(np.asarray(images)), tf.constant(np.asarray(labels))
    count = int(labels.shape[0])

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    return without_autotuning(
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(epoch_batches)
        .map(lambda indices: (tf.gather(images, indices), tf.gather(labels, indices)))
        .prefetch(2)
    )


def without_autotuning(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The dataset with tf.data's autotuning off.

    Autotuning runs a thread that sleeps between optimisations for periods that grow to seconds,
    and deleting the dataset's iterator waits for it to wake (~RootDataset::Iterator in a native
    stack): now and then a wait of that length after the last epoch, inside `fit`.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves every variable of the model and its optimizer after each epoch, atomically, for an exact resume.

    Every variable, random-seed states included: neither keras.callbacks.BackupAndRestore (no optimizer
    moments) nor model.save (no seed states of dropout or augmentation layers) keeps all that a resumed
    run needs to take the updates an uninterrupted one would. Plain arrays, loaded without pickle.
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def on_epoch_end(self, epoch, logs=None):
        with atomic_path(self.directory / CHECKPOINT_NAME) as temporary:
            np.savez(temporary, *[variable.numpy() for variable in training_state(self.model)])


def training_state(model: keras.Model) -> list:
    """The model's variables (weights and random-seed states) and its optimizer's (step count, moments)."""
    return [*model.variables, *model.optimizer.variables]


def resume(model: keras.Model, directory: Path) -> tuple[int, str | None]:
    """Restores the training state saved in `directory`: (optimizer steps done, the MLflow run it was
    logged to), or (0, None) when there is none. A damaged checkpoint is one line: train it anew."""
    checkpoint = directory / CHECKPOINT_NAME
    if not checkpoint.exists():
        return 0, None
    model.optimizer.build(model.trainable_variables)
    state = training_state(model)
    try:
        with np.load(checkpoint, allow_pickle=False) as saved:
            values = [saved[f"arr_{index}"] for index in range(len(saved.files))]
        if [value.shape for value in values] != [tuple(variable.shape) for variable in state]:
            raise ValueError(f"its {len(values)} arrays do not fit the model's {len(state)} variables")
        run_id = json.loads((directory / "run.json").read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise PipelineError(
            f"the checkpoint of an interrupted training in {directory} is damaged ({error!s}); delete it "
            f"(`rm -r {directory}`) and run again: the training starts over from epoch 1"
        ) from None
    for variable, value in zip(state, values, strict=True):
        variable.assign(value)
    return int(model.optimizer.iterations.numpy()), run_id  # optimizer steps: epochs x steps per epoch


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops a diverged training at the end of its first non-finite epoch, before that epoch is logged
    or checkpointed: the run ends FAILED, no model lands, and a resume starts from the last finite epoch.

    Rather than keras.callbacks.TerminateOnNaN, which ends `fit` normally: the NaN model would be saved.
    """

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config = config

    def on_epoch_end(self, epoch, logs=None):
        losses = {name: value for name, value in (logs or {}).items() if "loss" in name and not math.isfinite(value)}
        if losses:
            found = ", ".join(f"{name} {value}" for name, value in losses.items())
            precision = " or turn off train.mixed_precision" if self.config.mixed_precision else ""
            raise PipelineError(
                f"the training diverged in epoch {epoch + 1} ({found}); lower train.learning_rate "
                f"(now {self.config.learning_rate:g}){precision} and run again; no model was saved"
            )


class StopWhenInterrupted(keras.callbacks.Callback):
    """Stops `fit` at its next call of steps after a Ctrl-C or SIGTERM whose KeyboardInterrupt Python
    dropped (pipeline/errors.py): otherwise the training would run to its end before the stage stops.
    On the batches' begin: a callback on their end turns Keras's asynchronous dispatch of them off."""

    def on_train_batch_begin(self, batch, logs=None):
        raise_if_interrupted()

    def on_test_batch_begin(self, batch, logs=None):
        raise_if_interrupted()


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's losses, accuracies, duration and throughput to the active MLflow run."""

    def __init__(self, samples_per_epoch: int):
        super().__init__()
        self.samples_per_epoch = samples_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        # Step = the epoch's number, 1..N, as the curves' PNG counts them (Keras counts from 0).
        mlflow.log_metrics(
            {
                **{key: as_float32_decimal(value) for key, value in logs.items()},
                "epoch_seconds": seconds,
                "samples_per_second": self.samples_per_epoch / seconds,
            },
            step=epoch + 1,
        )


class DeviceMemoryLogger(keras.callbacks.Callback):
    """Logs per epoch the memory TensorFlow's allocator holds on each device, at the epoch's end and at
    its peak (tf.config.experimental.get_memory_info), as gpu_<i>_memory_megabytes and
    gpu_<i>_memory_peak_megabytes: what the training itself needed, beside MLflow's system/gpu_* view
    of the whole device."""

    def __init__(self, devices: list[str]):
        super().__init__()
        self.devices = devices  # "GPU:0", ...

    def on_epoch_begin(self, epoch, logs=None):
        for device in self.devices:
            tf.config.experimental.reset_memory_stats(device)  # the peak of this epoch, not of the process

    def on_epoch_end(self, epoch, logs=None):
        metrics = {}
        for device in self.devices:
            memory = tf.config.experimental.get_memory_info(device)
            name = device.lower().replace(":", "_")
            metrics[f"{name}_memory_megabytes"] = memory["current"] / 1e6  # megabytes, as MLflow's system/gpu_*
            metrics[f"{name}_memory_peak_megabytes"] = memory["peak"] / 1e6
        mlflow.log_metrics(metrics, step=epoch)


def gpu_memory_logger() -> list[keras.callbacks.Callback]:
    """A DeviceMemoryLogger over every GPU TensorFlow sees; none without one (the gpu.metrics tags say why)."""
    gpus = tf.config.list_physical_devices("GPU")
    return [DeviceMemoryLogger([f"GPU:{index}" for index in range(len(gpus))])] if gpus else []


def as_float32_decimal(value: float) -> float:
    """Keras's float32 metric as the shortest decimal that is the same float32 (0.9756, not the float64
    0.975600004196167 that widening it gives): the same value, as it reads in the UI and the CSV."""
    return float(str(np.float32(value)))


def distribution_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The devices training runs on (conf/config.yaml, train.distribution and train.replicas)."""
    if config.distribution == "single":
        return tf.distribute.get_strategy()  # TensorFlow's default placement: a GPU if there is one
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        replicas = config.replicas or len(gpus)
        if replicas > len(gpus):
            raise PipelineError(
                f"train.replicas={replicas} but {len(gpus)} GPU(s) are visible; "
                "lower train.replicas or set it to null (every visible GPU)"
            )
        return tf.distribute.MirroredStrategy([f"/gpu:{index}" for index in range(replicas)])
    # No GPU: split the CPU into logical devices (must happen before TensorFlow initialises them).
    replicas = config.replicas or 1
    [cpu] = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(replicas)])


def steps_per_call(steps_per_epoch: int, steps_per_execution: int) -> int:
    """The largest divisor of steps_per_epoch up to train.steps_per_execution.

    Keras always runs whole calls of steps_per_execution steps: one that straddled an epoch's end
    would carry its steps into the next epoch, shifting every validation, checkpoint and logged
    epoch off the data's epoch boundaries. A divisor runs the same updates on the same batches.
    """
    return max(
        steps for steps in range(1, min(steps_per_execution, steps_per_epoch) + 1) if steps_per_epoch % steps == 0
    )


def train(model_config: MlpConfig | CnnConfig, train_config: TrainConfig) -> None:
    strategy = set_up(train_config)
    train_images, train_labels = load_split("train")
    validation_images, validation_labels = load_split("validation")
    manifest = read_manifest()
    # The data section comes from the manifest: it is what preprocess actually used.
    params = training_params({"data": DataConfig(**manifest["config"]), "model": model_config, "train": train_config})
    run_name, tags = describe_run(model_config, train_config, params, manifest["data_hash"], strategy)
    # A killed run leaves its last completed epoch here; the same config, data, code and numeric
    # environment resume it (epochs from other kernels would make weights that neither one gives).
    checkpoint_dir = CHECKPOINT_ROOT / config_hash(
        {**params, "data.hash": manifest["data_hash"], "code": code_fingerprint(), "numerics": numerics.from_tags(tags)}
    )

    # Each update sees batch_size samples per replica; Keras splits every global batch among them.
    global_batch_size = train_config.batch_size * strategy.num_replicas_in_sync
    steps_per_epoch = -(-len(train_labels) // global_batch_size)
    model = build_compiled_model(model_config, train_config, strategy, steps_per_epoch)
    steps_done, interrupted_run = resume(model, checkpoint_dir)
    first_epoch = steps_done // steps_per_epoch
    if first_epoch:
        print(f"train: resuming after epoch {first_epoch} from {checkpoint_dir}", file=sys.stderr)

    # Logged first, landed after: a training that cannot log its model leaves no model that looks finished.
    with (
        staged_outputs() as staged,
        tracking.training_run(run_name, params, tags, continue_run_id=interrupted_run) as run,
    ):
        write_json(checkpoint_dir / "run.json", {"run_id": run.info.run_id})
        tracking.log_dataset("train", train_images, train_labels, manifest)
        tracking.log_dataset("validation", validation_images, validation_labels, manifest)
        started = time.perf_counter()
        model.fit(
            training_batches(
                train_images, train_labels, global_batch_size, train_config.seed, first_epoch, train_config.epochs
            ),
            steps_per_epoch=steps_per_epoch,
            initial_epoch=first_epoch,
            epochs=train_config.epochs,
            validation_data=without_autotuning(
                tf.data.Dataset.from_tensor_slices(
                    (np.asarray(validation_images), np.asarray(validation_labels))
                ).batch(VALIDATION_BATCH_SIZE)
            ),
            # A diverged epoch stops first. Log, then checkpoint: after a death between the two, the epoch
            # is redone and re-logged, not lost.
            callbacks=[
                StopWhenInterrupted(),
                StopOnNonFiniteLoss(train_config),
                EpochLogger(len(train_labels)),
                *gpu_memory_logger(),
                EpochCheckpoint(checkpoint_dir),
            ],
            shuffle=False,  # training_batches shuffles, per epoch, in a resumable order
            verbose=2,
        )
        mlflow.log_metric("fit_seconds", time.perf_counter() - started)
        save_and_log_model(model, tags, staged)
        # The run's metric history spans every attempt of a resumed training.
        write_history(run.info.run_id, staged / HISTORY_FILE, staged / CURVES_FILE)
        tracking.log_artifacts([staged / HISTORY_FILE, staged / CURVES_FILE], "training")
        write_json(staged / RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def set_up(config: TrainConfig) -> tf.distribute.Strategy:
    """Devices, seeds, op determinism and precision: everything before the first variable exists."""
    strategy = distribution_strategy(config)
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    gpus = tf.config.list_physical_devices("GPU")
    gpu_metrics = gpu_metrics_tags(len(gpus))
    missing = gpu_metrics.get(tracking.GPU_METRICS_MISSING_TAG)
    print(
        (
            f"train: on {len(gpus)} GPU(s), {strategy.num_replicas_in_sync} replica(s)"
            if gpus
            else f"train: on the CPU ({os.cpu_count()} cores; TensorFlow sees no GPU)"
        )
        + f"; GPU metrics: {gpu_metrics[tracking.GPU_METRICS_TAG]}{f' ({missing})' if missing else ''}",
        file=sys.stderr,
    )
    return strategy


def gpu_metrics_tags(gpus: int) -> dict[str, str]:
    return tracking.gpu_metrics(gpus, numerics.tensorflow_build())


def build_compiled_model(
    model_config: MlpConfig | CnnConfig,
    train_config: TrainConfig,
    strategy: tf.distribute.Strategy,
    steps_per_epoch: int,
) -> keras.Model:
    # No XLA (jit_compile): Keras turns it off while op determinism is on (model_supports_jit in
    # keras/src/trainers/trainer.py), and bit-identical weights matter more here than its speed.
    with strategy.scope():  # variables are mirrored on every replica
        model = with_fused_batch_normalization(build_model(model_config))
        model.compile(
            optimizer=fused_adam(learning_rate(train_config, steps_per_epoch)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            steps_per_execution=steps_per_call(steps_per_epoch, train_config.steps_per_execution),
            jit_compile=False,
        )
    return model


def fused_adam(learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> keras.optimizers.Adam:
    """Keras's Adam, each variable's update one fused TensorFlow kernel (ResourceApplyAdam).

    Keras 3 writes the update as about ten element-wise ops per variable (update_step in
    keras/src/optimizers/adam.py), each a pass over the variable's memory, which only XLA would fuse;
    without XLA, a small model's CPU step spends much of its time in them. The kernel computes the same
    formula on the same variables (ApplyAdam in tensorflow/core/kernels/training_ops.cc), in one pass.
    The update is swapped on the instance rather than in a subclass, so a saved model holds a plain
    keras.optimizers.Adam that any Keras loads: a subclass would have to be importable wherever the
    model is loaded, `mlflow models serve` included.
    """
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer.update_step = types.MethodType(fused_adam_update, optimizer)
    return optimizer


def fused_adam_update(optimizer: keras.optimizers.Adam, gradient, variable, learning_rate) -> None:
    dtype = variable.dtype
    step = keras.ops.cast(optimizer.iterations + 1, dtype)
    index = optimizer._get_variable_index(variable)  # as Adam.update_step finds its moments
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle,
        m=optimizer._momentums[index].handle,
        v=optimizer._velocities[index].handle,
        beta1_power=keras.ops.power(keras.ops.cast(optimizer.beta_1, dtype), step),
        beta2_power=keras.ops.power(keras.ops.cast(optimizer.beta_2, dtype), step),
        lr=keras.ops.cast(learning_rate, dtype),
        beta1=keras.ops.cast(optimizer.beta_1, dtype),
        beta2=keras.ops.cast(optimizer.beta_2, dtype),
        epsilon=keras.ops.cast(optimizer.epsilon, dtype),
        grad=keras.ops.cast(gradient, dtype),
    )


def with_fused_batch_normalization(model: keras.Model) -> keras.Model:
    """The model, each BatchNormalization layer's training step one fused TensorFlow kernel (FusedBatchNormV3).

    Keras 3 normalises a batch with about a dozen element-wise ops (ops.moments, then
    tf.nn.batch_normalization) and differentiates each of them, a pass over the activations apiece;
    the kernel and its gradient make one pass each, which shortens every training step of the CNN
    preset (`make bench` times it). Inference keeps Keras's own call, and the call is swapped on the
    instances, as in fused_adam: the saved model holds plain BatchNormalization layers.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.call = types.MethodType(fused_batch_normalization_call, layer)
    return model


def fused_batch_normalization_call(layer: keras.layers.BatchNormalization, inputs, training=None, mask=None):
    # Keras's own call where the kernel does not apply: inference (moving statistics), a frozen
    # layer, a mask, inputs other than images with their channels last.
    if not (training and layer.trainable) or mask is not None or inputs.ndim != 4 or layer.axis not in (-1, 3):
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=tf.cast(inputs, "float32"),
        scale=layer.gamma,
        offset=layer.beta,
        mean=tf.zeros([0]),
        variance=tf.zeros([0]),
        epsilon=layer.epsilon,
        is_training=True,
    )
    # The kernel returns the unbiased variance (over n - 1); Keras averages the biased one (over n).
    count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
    layer.moving_mean.assign(layer.moving_mean * layer.momentum + mean * (1 - layer.momentum))
    layer.moving_variance.assign(
        layer.moving_variance * layer.momentum + variance * (count - 1) / count * (1 - layer.momentum)
    )
    return tf.cast(outputs, layer.compute_dtype)


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """train.learning_rate, constant or along train.schedule.

    A schedule is a function of the optimizer's step count, which a resumed run restores: it goes on
    from the step where the interrupted one stopped.
    """
    if config.schedule == "constant":
        return config.learning_rate
    warmup_steps = steps_per_epoch // 2
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10,
        warmup_target=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=steps_per_epoch * config.epochs - warmup_steps,
    )


def save_and_log_model(model: keras.Model, tags: dict[str, str], staged: StagedOutputs) -> None:
    """models/model.keras, its numeric environment (reports/numerics.json), and the model in MLflow."""
    with atomic_path(staged / MODEL_FILE) as temporary:
        model.save(temporary)
    write_json(staged / numerics.NUMERICS_FILE, numerics.from_tags(tags))
    # Explicit requirements: inferring them costs seconds and adds nothing here. Exported (Keras's
    # model.export, a SavedModel whose `serve` is the inference function): MLflow's pyfunc then calls
    # `serve`, where it would call `predict` with Keras's default verbosity, a progress bar per request in
    # any model server (KerasModelWrapper in mlflow/keras/load.py has no way to pass verbose=0). The
    # export's endpoint listing goes to a buffer: the model's signature says the same.
    with contextlib.redirect_stdout(io.StringIO()):
        mlflow.keras.log_model(
            model,
            name="model",
            signature=SIGNATURE,
            save_exported_model=True,
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )


def describe_run(
    model_config: MlpConfig | CnnConfig,
    train_config: TrainConfig,
    params: dict,
    data_hash: str,
    strategy: tf.distribute.Strategy,
) -> tuple[str, dict[str, str]]:
    """The run's name and its tags: what it was trained on, with what, and where."""
    gpus = tf.config.list_physical_devices("GPU")
    tags = {
        "data.hash": data_hash,
        "config.hash": config_hash(params),
        # Runs of one setting with different seeds share this: `make compare` groups by it.
        "config.hash_without_seed": config_hash(params, ignore=("train.seed",)),
        "model.name": model_config.name,
        "tensorflow.device": "GPU" if gpus else "CPU",
        "train.replicas_in_sync": str(strategy.num_replicas_in_sync),
        **gpu_metrics_tags(len(gpus)),  # which GPU metrics the run records, and why not
        # What decides the weights' last bits (CPU ISA, threads, oneDNN, GPU): `make reproduce` reads it.
        **numerics.as_tags(numerics.numeric_environment()),
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # set per queue worker by `make sweep`
        tags["env.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    # Set by `make sweep` and `make tune` for the experiments they run.
    for variable, tag in (
        ("PIPELINE_SWEEP", "sweep"),
        ("PIPELINE_STUDY", "tune.study"),
        ("PIPELINE_TRIAL", "tune.trial"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return run_name(params), tags


def run_name(params: dict) -> str:
    """`<setting>[-<key>=<value>...]-seed<n>`: the preset of conf/experiment/ this config is closest to,
    the values where it differs from that preset's composition of the committed conf/ (data.limit
    included), and the seed. `make sweep`'s `lr_x10-seed0` is its DVC experiment's name too; a plain
    `dvc exp run -S train.epochs=3` is `default-epochs=3-seed0`, its DVC name in the tag dvc.exp_name.
    """
    differences = {}
    for setting in SETTINGS:
        if (CONF_DIR / "experiment" / f"{setting}.yaml").exists():
            preset = training_params(validate(compose([f"+experiment={setting}"])))
            differences[setting] = [
                key
                for key in sorted(set(params) | set(preset))
                if key != "train.seed" and params.get(key) != preset.get(key)
            ]
    setting = min(differences, key=lambda name: len(differences[name]))  # the first of SETTINGS on a tie
    changed = "".join(
        f"-{key.rpartition('.')[2]}={name_value(params.get(key))}" for key in differences[setting] if key in params
    )
    return f"{setting}{changed}-seed{params['train.seed']}"


def name_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(map(name_value, value))
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def code_fingerprint() -> str:
    """What else decides the weights: the code that shapes them and the exact packages (TRAINING_INPUTS)."""
    files = [project_root() / path for path in TRAINING_INPUTS]
    return hashlib.sha256(b"".join(path.read_bytes() for path in files if path.exists())).hexdigest()


def write_history(run_id: str, history_file: Path, curves_file: Path) -> None:
    client = mlflow.MlflowClient()
    table = (
        pd.DataFrame(
            {
                # A re-done epoch is logged twice with the same values: keep one point per step (= epoch).
                metric: {point.step: point.value for point in client.get_metric_history(run_id, metric)}
                for metric in ("loss", "accuracy", "val_loss", "val_accuracy")
            }
        )
        .sort_index()
        .rename_axis("epoch")
        .reset_index()
    )
    write_csv(history_file, table)

    from matplotlib.ticker import MaxNLocator

    figure, (loss_axes, accuracy_axes) = pyplot().subplots(1, 2, figsize=(10, 4), layout="tight")
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(table.epoch, table[metric], marker="o", label="training")
        axes.plot(table.epoch, table[f"val_{metric}"], marker="o", label="validation")
        axes.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, curves_file)


if __name__ == "__main__":
    run_stage(train, "model", "train")
