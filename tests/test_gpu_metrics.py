"""Which GPU metrics a training run records, and why not: checked on a CPU (no test here has a GPU)."""

import importlib.metadata
import json
import os
import subprocess
import sys

import mlflow
import pytest

from pipeline import tracking
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(
    any(os.path.exists(path) for path in ("/dev/nvidia0", "/proc/driver/nvidia")),
    reason="written for a machine without a GPU",
)

# The per-epoch memory logger on a stand-in for a GPU: the CPU device with TensorFlow's BFC allocator
# (TF_CPU_ALLOCATOR_USE_BFC), the allocator GPUs use, which counts what it holds as a GPU's does.
STAND_IN = """
import sys, mlflow, keras, numpy as np
from pipeline.train import DeviceMemoryLogger
mlflow.set_tracking_uri(sys.argv[1])
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(10)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
with mlflow.start_run() as run:
    model.fit(
        np.ones((512, 64), "float32"), np.zeros(512), epochs=2, verbose=0, callbacks=[DeviceMemoryLogger(["CPU:0"])]
    )
print(run.info.run_id)
"""


def test_a_run_without_nvml_or_gpu_says_so():
    """The CPU install (no nvidia-ml-py) with TensorFlow seeing no GPU: MLflow's GPU monitor is built
    and fails as it does when a run starts; the tags say that nothing is recorded, and both reasons."""
    tags = tracking.gpu_metrics(0, "CPU")
    assert tags[tracking.GPU_METRICS_TAG] == "none"
    missing = tags[tracking.GPU_METRICS_MISSING_TAG]
    assert "no NVML: nvidia-ml-py is not installed" in missing and "no GPU: TensorFlow (CPU build) sees none" in missing


def test_a_gpu_without_nvml_records_the_training_figures_only():
    tags = tracking.gpu_metrics(1, "CUDA")
    assert tags[tracking.GPU_METRICS_TAG] == "training"
    assert tags[tracking.GPU_METRICS_MISSING_TAG].startswith("no NVML")


@pytest.mark.slow
def test_the_memory_logger_logs_each_epochs_memory_on_a_stand_in_device(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", STAND_IN, uri], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    run_id = result.stdout.split()[-1]
    current, peak = (client.get_metric_history(run_id, f"cpu_0_memory{kind}_megabytes") for kind in ("", "_peak"))
    assert [point.step for point in current] == [point.step for point in peak] == [0, 1]
    # The weights and Adam's moments stay allocated: at least the model's 19,210 float32 weights (0.077 MB).
    assert all(0.077 <= now.value <= top.value for now, top in zip(current, peak, strict=True))


@pytest.mark.slow
def test_a_cpu_training_run_is_tagged_with_why_no_gpu_metrics(pipeline_run):
    project, _, result = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    tags = run.data.tags
    assert tags[tracking.GPU_METRICS_TAG] == "none"
    assert "no GPU" in tags[tracking.GPU_METRICS_MISSING_TAG]
    assert not [key for key in run.data.metrics if key.startswith(("gpu_", "system/gpu_"))]
    # The train stage's device line says the same.
    output = result.stdout + result.stderr
    assert f"GPU metrics: none ({tags[tracking.GPU_METRICS_MISSING_TAG]})" in output
    # The numeric environment records which TensorFlow build trained: tensorflow-cpu is the CPU one.
    build = "CPU" if installed("tensorflow-cpu") else "CUDA"
    assert json.loads((project / "reports/numerics.json").read_text())["tensorflow.build"] == build


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
