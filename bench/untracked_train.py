"""The train stage with MLflow switched off: the "off" side of the tracking-overhead figure.

Runs pipeline.train's own `train()` on params.yaml with every MLflow call it makes replaced by
a no-op: no run, no params, no per-epoch metrics, no system-metrics sampler, no logged model.
It also skips the history CSV and training curves, which are built from the tracked metrics, so
the overhead it measures is an upper bound. For `make bench` only: nothing is recorded.
"""

import contextlib
import sys
import types

import mlflow
import mlflow.keras

from pipeline import tracking
from pipeline import train as train_stage
from pipeline.config import run_stage


@contextlib.contextmanager
def untracked_run(*arguments, **keywords):
    yield types.SimpleNamespace(info=types.SimpleNamespace(run_id="untracked", experiment_id="untracked"))


def nothing(*arguments, **keywords) -> None:
    pass


if __name__ == "__main__":
    tracking.training_run = untracked_run
    tracking.log_artifacts = nothing
    mlflow.log_metrics = mlflow.log_metric = mlflow.keras.log_model = nothing
    train_stage.write_history = nothing
    run_stage(train_stage.train, "model", "train")
    print("untracked_train: done", file=sys.stderr)
