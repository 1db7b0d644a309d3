"""The MNIST pipeline: one module per DVC stage, plus config, errors, tracking, data_io, numerics and models."""

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

# TensorFlow's C++ start-up chatter (CUDA probing on a CPU-only machine, oneDNN and CPU feature
# notes) buries the stage output: quiet by default. TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# MLflow's INFO lines (store migrations, system-metrics threads) likewise: MLFLOW_LOGGING_LEVEL=INFO.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# A tracking server that goes away fails the stage in seconds (3 tries, 1-2-4 s apart), not after
# MLflow's default of 7 retries over minutes; a training resumes from its last epoch afterwards.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# Written to file descriptor 2 while TensorFlow loads, before its log level applies.
IMPORT_NOTICES = ("All log messages before absl::InitializeLog() is called", "cudart_stub.cc")


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
