"""What an entry point sets up before it runs: the stages (`python -m pipeline.<stage>`), the commands
(`python -m commands.<command>`), the tests and the bench. Importing this module changes nothing.

`python -m pipeline.train` imports the package before the module, so pipeline/__init__.py calls start()
there: the defaults below apply before TensorFlow or MLflow is imported, and a stage can run as a fork of
the warm process (commands/warm.py) before it pays those imports itself, or start one for the stages after it.
"""

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Each default gives way to a value the caller set.
DEFAULTS = {
    # TensorFlow's C++ start-up chatter (CUDA probing on a CPU-only machine, oneDNN and CPU feature
    # notes) buries the stage output: TF_CPP_MIN_LOG_LEVEL=0 brings it back.
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # MLflow's INFO lines (store migrations, system-metrics threads) likewise: MLFLOW_LOGGING_LEVEL=INFO.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # MLflow 3 sends usage events (which of its APIs ran, versions, an installation id) to its makers by
    # default (https://mlflow.org/docs/latest/community/usage-tracking); nothing here leaves the
    # machine unasked, as with DVC's analytics (.dvc/config). MLFLOW_DISABLE_TELEMETRY=false allows it.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A tracking server that goes away fails the stage in seconds (3 tries, 1-2-4 s apart), not after
    # MLflow's default of 7 retries over minutes; a training resumes from its last epoch afterwards.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI, BF16 or AMX
    # (https://github.com/tensorflow/tensorflow/releases/tag/v2.9.0) and leaves other x86 CPUs on
    # Eigen's, whose convolutions and pooling are slower. On here, so that every x86 machine runs the
    # same family of kernels; TF_ENABLE_ONEDNN_OPTS=0 turns it off.
    "TF_ENABLE_ONEDNN_OPTS": "1",
}

# The environment the entry point started with, before the defaults: `make reproduce` runs another
# commit's stages in it, so that they take that commit's own defaults.
caller_environment: dict[str, str] = {}


def apply_defaults() -> None:
    """Sets DEFAULTS where the caller left them unset; remembers the caller's environment first."""
    if not caller_environment:
        caller_environment.update(os.environ)
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def main_module() -> str | None:
    """The module this process was started to run with `python -m`, while Python is still importing
    its package (sys.argv[0] is "-m" until the module itself runs); None otherwise."""
    if sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv:
        return sys.orig_argv[sys.orig_argv.index("-m") + 1]
    return None


def start(module: str) -> None:
    """An entry point's first step: the defaults, then, for a stage, the hand-over to the warm process
    (which returns when the stage is to run here, after starting one in the background if none is up)."""
    apply_defaults()
    if module.startswith("pipeline."):
        from commands import warm

        warm.hand_over(module)


# Written to file descriptor 2 while TensorFlow loads, before its log level applies (oneDNN's
# is about the default above, which reports/numerics.json records).
IMPORT_NOTICES = (
    "All log messages before absl::InitializeLog() is called",
    "cudart_stub.cc",
    "oneDNN custom operations are on",
)


@contextmanager
def tensorflow_import_notices_hidden() -> Iterator[None]:
    """Drops TensorFlow's import-time notices (IMPORT_NOTICES) and passes every other line on."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
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
