"""The MNIST pipeline: one module per DVC stage (config composes params.yaml; download, preprocess,
train, evaluate, error_analysis) and the modules they share (errors, data_io, tracking, numerics,
models, runtime). The commands behind the Makefile's targets are in the `commands` package.

Importing the package changes nothing. Started as `python -m pipeline.<stage>`, the process applies
its defaults here, before the stage's own imports (pipeline/runtime.py says why).
"""

import os
from pathlib import Path

from pipeline import runtime


def project_root() -> Path:
    # DVC points DVC_ROOT at the main repository even for queued experiments, which run in
    # temporary copies under .dvc/tmp/exps/: a store resolved from the working directory
    # would be deleted with the copy.
    return Path(os.environ.get("DVC_ROOT") or Path(__file__).resolve().parent.parent)


if (_module := runtime.main_module()) and _module.startswith(f"{__name__}."):
    runtime.start(_module)
