#!/usr/bin/env bash
# bench/gpu.sh: the train stage on a GPU, for the time to 99% accuracy and the GPU metrics MLflow saw.
#
# One prepared script for a machine with an NVIDIA GPU; it installs nothing. It needs the project's
# GPU environment (`make` installs requirements-gpu.lock where nvidia-smi lists a GPU, or with GPU=1:
# TensorFlow's CUDA build and NVML) and MNIST (MNIST_MIRROR, or the official mirrors). It trains the CNN
# preset twice in a throwaway copy of HEAD, plain and with mixed precision (float16 on tensor cores), and
# writes bench/gpu-results.md.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$repo/.venv/bin:$PATH"
python -c 'import sys, tensorflow as tf; tf.config.list_physical_devices("GPU") or sys.exit(
    "error: gpu.sh: TensorFlow sees no GPU; its CUDA build is in the GPU lock: GPU=1 make .venv/.installed")'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git -C "$repo" archive HEAD | tar -x -C "$work"
cd "$work"
git init -q && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > gpu.txt

for variant in "plain:train.mixed_precision=false" "mixed precision:train.mixed_precision=true"; do
    # shellcheck disable=SC2086  # the overrides are meant to split
    python -m pipeline.config +experiment=cnn ${variant#*:}
    dvc repro evaluate
    mkdir -p runs && cp models/run.json "runs/${variant%%:*}.json"
done

python - "$repo/bench/gpu-results.md" <<'PY'
"""Time to 99% validation accuracy (summed epoch times) and the GPU metrics, from the MLflow runs."""
import json, pathlib, sys, itertools
import mlflow

mlflow.set_tracking_uri(f"sqlite:///{pathlib.Path('mlflow.db').resolve()}")
client = mlflow.MlflowClient()
lines = [f"# GPU benchmark\n\nMeasured by `bench/gpu.sh` on {pathlib.Path('gpu.txt').read_text().strip()}.\n",
         "| variant | first epoch with val_accuracy ≥ 99% | time to it (s, epochs summed) | test accuracy | peak GPU utilisation | peak GPU memory (MB) | TensorFlow's peak per epoch (MB) | gpu.metrics |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for path in sorted(pathlib.Path("runs").glob("*.json")):
    run_id = json.loads(path.read_text())["run_id"]
    run = client.get_run(run_id)
    history = lambda name: [point.value for point in sorted(client.get_metric_history(run_id, name), key=lambda p: p.step)]
    accuracies, seconds = history("val_accuracy"), list(itertools.accumulate(history("epoch_seconds")))
    reached = next((epoch for epoch, value in enumerate(accuracies) if value >= 0.99), None)
    peak = lambda name: max(history(name), default=float("nan"))
    lines.append(f"| {path.stem} | {'not reached' if reached is None else reached + 1} | "
                 f"{'-' if reached is None else f'{seconds[reached]:.2f}'} | {run.data.metrics.get('test_accuracy', float('nan')):.2%} | "
                 f"{peak('system/gpu_0_utilization_percentage'):.0f}% | {peak('system/gpu_0_memory_usage_megabytes'):.0f} | "
                 f"{peak('gpu_0_memory_peak_megabytes'):.0f} | {run.data.tags.get('gpu.metrics')} {run.data.tags.get('gpu.metrics.missing', '')} |")
pathlib.Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
