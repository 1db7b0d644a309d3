"""The numeric environment: what decides a result's last bits, recorded beside the result.

On a CPU, TensorFlow's kernels (oneDNN, and Eigen where oneDNN is off) choose instructions,
blocking and the split of work by instruction set, cache sizes and thread count. The same code,
config, seed and data therefore give bit-identical results on the same kind of machine and
slightly different ones on another (oneDNN promises no identity across CPUs:
https://github.com/uxlfoundation/oneDNN/issues/1443). The train stage writes this fingerprint
to reports/numerics.json (git-tracked, beside reports/metrics.json) and to its MLflow run's
tags, so that `make reproduce` knows whether to expect an exact match.
"""

import os
import subprocess
from pathlib import Path

from pipeline.data_io import REPORTS_DIR

NUMERICS_FILE = REPORTS_DIR / "numerics.json"
TAG_PREFIX = "numerics."
# The CPU features oneDNN and Eigen dispatch on (/proc/cpuinfo names); the rest of the flags
# (virtualisation, security mitigations) change no arithmetic.
KERNEL_ISA_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",  # 64-bit Arm
)
# How each key reads in a message (the keys themselves are what files and tags hold).
LABELS = {
    "cpu.vendor": "CPU vendor",
    "cpu.family_model_stepping": "CPU family/model/stepping",
    "cpu.model_name": "CPU model",
    "cpu.isa": "CPU ISA",
    "cpu.cores": "CPU cores",
    "threads.intra_op": "TensorFlow intra-op threads",
    "threads.inter_op": "TensorFlow inter-op threads",
    "tensorflow.version": "TensorFlow version",
    "tensorflow.build": "TensorFlow build",
    "onednn": "oneDNN (TF_ENABLE_ONEDNN_OPTS)",
    "onednn.max_cpu_isa": "oneDNN ISA cap (ONEDNN_MAX_CPU_ISA)",
    "gpu": "GPU",
    "gpu.driver": "GPU driver",
    "cuda": "CUDA",
    "cudnn": "cuDNN",
}


def cpu_fingerprint(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """CPU vendor, family/model/stepping, model name, the kernel-relevant ISA flags, usable cores."""
    fields = {}
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block describes them all
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu.vendor": fields.get("vendor_id") or fields.get("CPU implementer") or "unknown",
        "cpu.family_model_stepping": "/".join(fields.get(key, "?") for key in ("cpu family", "model", "stepping")),
        "cpu.model_name": fields.get("model name", "unknown"),
        "cpu.isa": " ".join(flag for flag in KERNEL_ISA_FLAGS if flag in flags) or "unknown",
        "cpu.cores": str(len(os.sched_getaffinity(0))),
    }


def numeric_environment() -> dict[str, str]:
    """The whole numeric environment of this process (imports TensorFlow)."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port  # no public API tells whether oneDNN is on

    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    environment = {
        **cpu_fingerprint(),
        # 0 means TensorFlow's default: one thread per usable core.
        "threads.intra_op": str(
            tf.config.threading.get_intra_op_parallelism_threads() or os.environ.get("TF_NUM_INTRAOP_THREADS") or 0
        ),
        "threads.inter_op": str(
            tf.config.threading.get_inter_op_parallelism_threads() or os.environ.get("TF_NUM_INTEROP_THREADS") or 0
        ),
        "tensorflow.version": tf.__version__,
        "tensorflow.build": tensorflow_build(),
        # TensorFlow's own answer: its default depends on the CPU, and the pipeline sets one (pipeline/__init__.py).
        "onednn": "on" if _pywrap_util_port.IsMklEnabled() else "off",
        "onednn.max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "none"),
    }
    if gpus:
        environment["gpu"] = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "unknown")
        environment["gpu.driver"] = gpu_driver()
        environment["cuda"] = str(build.get("cuda_version", "unknown"))
        environment["cudnn"] = str(build.get("cudnn_version", "unknown"))
    return environment


def tensorflow_build() -> str:
    """TensorFlow's build: "CUDA" (the tensorflow package on Linux) or "CPU" (tensorflow-cpu)."""
    import tensorflow as tf

    return "CUDA" if tf.sysconfig.get_build_info().get("is_cuda_build") else "CPU"


def gpu_driver() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def as_tags(environment: dict[str, str]) -> dict[str, str]:
    return {TAG_PREFIX + key: value for key, value in environment.items()}


def from_tags(tags: dict[str, str]) -> dict[str, str]:
    return {key[len(TAG_PREFIX) :]: value for key, value in tags.items() if key.startswith(TAG_PREFIX)}


def differences(reference: dict[str, str], here: dict[str, str]) -> list[str]:
    """One readable line per key that differs, e.g. 'CPU ISA: avx512f ... in the reference only'."""
    lines = []
    for key in sorted(set(reference) | set(here), key=lambda key: list(LABELS).index(key) if key in LABELS else 99):
        want, got = reference.get(key, "none"), here.get(key, "none")
        if want == got:
            continue
        label = LABELS.get(key, key)
        if key == "cpu.isa":
            only_here = [flag for flag in got.split() if flag not in want.split()]
            only_there = [flag for flag in want.split() if flag not in got.split()]
            parts = [f"{' '.join(only_here)} here only"] * bool(only_here)
            parts += [f"{' '.join(only_there)} in the reference only"] * bool(only_there)
            lines.append(f"{label}: {'; '.join(parts)}")
        else:
            lines.append(f"{label}: {got} here, {want} in the reference")
    return lines
