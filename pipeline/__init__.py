"""The MNIST pipeline: one module per DVC stage (config composes params.yaml; download, preprocess,
train, evaluate, error_analysis), the modules they share (errors, data_io, tracking, numerics,
models), and the commands of the Makefile (warm, sweep, tune, compare, reproduce, serve, server).
"""

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The environment this process started with, before the defaults below: `make reproduce` runs another
# commit's stages in it, so that they take that commit's own defaults (an older one left oneDNN to
# TensorFlow).
CALLER_ENVIRONMENT = dict(os.environ)
# TensorFlow's C++ start-up chatter (CUDA probing on a CPU-only machine, oneDNN and CPU feature
# notes) buries the stage output: quiet by default. TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# MLflow's INFO lines (store migrations, system-metrics threads) likewise: MLFLOW_LOGGING_LEVEL=INFO.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# MLflow 3 sends usage events (which of its APIs ran, versions, an installation id) to its makers by
# default (https://mlflow.org/docs/latest/community/usage-tracking); nothing here leaves the
# machine unasked, as with DVC's analytics (.dvc/config). MLFLOW_DISABLE_TELEMETRY=false allows it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A tracking server that goes away fails the stage in seconds (3 tries, 1-2-4 s apart), not after
# MLflow's default of 7 retries over minutes; a training resumes from its last epoch afterwards.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI, BF16 or AMX
# (https://github.com/tensorflow/tensorflow/releases/tag/v2.9.0) and leaves other x86 CPUs on
# Eigen's. On an AVX2 CPU oneDNN's convolutions and max-pooling make a CNN epoch about half as long
# (README, Speed); the MLP's matrix products take the same time either way. On here, so every
# x86 machine runs the same family of kernels; TF_ENABLE_ONEDNN_OPTS=0 turns it off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def project_root() -> Path:
    # DVC points DVC_ROOT at the main repository even for queued experiments, which run in
    # temporary copies under .dvc/tmp/exps/: a store resolved from the working directory
    # would be deleted with the copy.
    return Path(os.environ.get("DVC_ROOT") or Path(__file__).resolve().parent.parent)


# Written to file descriptor 2 while TensorFlow loads, before its log level applies (oneDNN's
# is about the setting above, which reports/numerics.json records).
IMPORT_NOTICES = ("All log messages before absl::InitializeLog() is called", "cudart_stub.cc",
                  "oneDNN custom operations are on")


@contextmanager
def tensorflow_import_notices_hidden() -> Iterator[None]:
    """Drops TensorFlow's import-time notices (IMPORT_NOTICES) and passes every other line on."""
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "3":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in IMPORT_NOTICES):
                    sys.stderr.write(line)


# `make warm` (pipeline/warm.py): a stage started as `python -m pipeline.<stage>` runs as a fork of
# the warm process when one is up, instead of importing TensorFlow, MLflow and the rest itself.
def _hand_over_to_the_warm_process() -> None:
    if sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv:  # `python -m` imports this package before the module
        module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
        if module != "pipeline.warm":
            from pipeline import warm

            warm.hand_over(module)


_hand_over_to_the_warm_process()
