"""MLflow tracking: where the store is, the one run each trained model owns, and its lineage.

train creates the run and writes its id to models/run.json; evaluate and error-analysis reopen it,
so everything about one model lands in one run. Stages that DVC restores from its run cache do not
execute and log nothing: their models/run.json still points at the run that made them.
"""

import os
import platform
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError, guard
from pipeline.data_io import RUN_FILE, read_json, write_json

DEFAULT_EXPERIMENT = "mnist"
SERVER_TIMEOUT_SECONDS = 5
RESULT_INPUTS = ("pipeline", "conf", "dvc.yaml", "requirements.lock")


def project_root() -> Path:
    # DVC points DVC_ROOT at the main repository even for queued experiments, which run in
    # temporary copies under .dvc/tmp/exps/: a store resolved from the working directory
    # would be deleted with the copy.
    return Path(os.environ.get("DVC_ROOT") or Path(__file__).resolve().parent.parent)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """A tracking server (it chooses where artifacts go), rather than a local store."""
    return uri.startswith(("http://", "https://"))


def connect() -> str:
    """Points MLflow at the store, failing fast (not after minutes of retries) on a dead server."""
    uri = tracking_uri()
    if is_server(uri):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_SECONDS).close()
        except OSError as error:
            reason = getattr(error, "reason", None) or error
            raise PipelineError(f"MLflow tracking server {uri} does not answer ({reason}); start it "
                                "(`make server`) or unset MLFLOW_TRACKING_URI to use the local store") from None
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id() -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside mlflow.db; a server chooses (and proxies) its own.
    location = None if is_server(tracking_uri()) else (project_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException:  # a concurrent queue worker created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def git(*arguments: str, check: bool = False) -> str:
    """git's output; "" when it fails (outside a repository, say), or PipelineError with check."""
    result = subprocess.run(["git", *arguments], capture_output=True, text=True)
    if result.returncode != 0 and check:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise PipelineError(f"git {' '.join(arguments)}: {reason}")
    return result.stdout.strip() if result.returncode == 0 else ""


def lineage_tags() -> dict[str, str]:
    """Git commit and dirty flag, DVC experiment name and baseline."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    commit = baseline or git("rev-parse", "HEAD")
    # Dirty means the code, conf/ or environment differs from the commit. params.yaml, dvc.lock and
    # the outputs are left out: DVC writes them during runs (experiments apply their overrides to
    # params.yaml), and the run records every param itself.
    changes = git("status", "--porcelain", "--", *RESULT_INPUTS)
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.commit": commit or "unknown",
        "git.dirty": str(bool(changes) or not commit).lower(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if baseline:
        tags["dvc.baseline_rev"] = baseline
    return tags


def installed_packages() -> str:
    """The exact installed packages, as requirements text (the numeric environment is in numerics)."""
    from importlib.metadata import distributions

    return "\n".join(sorted(f"{dist.metadata['Name']}=={dist.version}" for dist in distributions())) + "\n"


@contextmanager
def training_run(run_name: str, params: dict, tags: dict,
                 continue_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Starts the model's run (with system metrics) and records its id in models/run.json.

    continue_run_id reopens an interrupted training's run, so a resumed training stays one run.
    On an exception the run is closed as FAILED, never left RUNNING.
    """
    connect()
    experiment = experiment_id()
    # Short runs need frequent samples to show anything; the sampler thread costs ~nothing.
    mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    if continue_run_id:
        try:
            mlflow.get_run(continue_run_id)
        except MlflowException:
            continue_run_id = None  # the store lost it: start afresh
    with mlflow.start_run(run_id=continue_run_id, experiment_id=None if continue_run_id else experiment,
                          run_name=None if continue_run_id else run_name,
                          tags={**lineage_tags(), "env.python": platform.python_version(), **tags}, log_system_metrics=True) as run:
        mlflow.log_params(params)
        mlflow.log_text(installed_packages(), "environment/requirements.txt")
        yield run
        write_json(RUN_FILE, {"run_id": run.info.run_id, "experiment_id": experiment})


@contextmanager
def model_run() -> Iterator[mlflow.ActiveRun]:
    """Reopens the run of the model in models/run.json, for evaluate and error-analysis."""
    run_id = read_json(RUN_FILE)["run_id"]
    uri = connect()
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        raise PipelineError(f"MLflow run {run_id} (from {RUN_FILE}) is not in the store {uri}; point "
                            "MLFLOW_TRACKING_URI at the store that holds it, or retrain with `dvc repro --force train`") from None
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_artifacts(paths: list[Path], artifact_path: str) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    print(f"tracking: logged {len(paths)} artifacts to run {mlflow.active_run().info.run_id}", file=sys.stderr)


def runs_url(host: str, port: int) -> None:
    """`make ui`, before starting the UI: checks that the port is free, prints the runs table's link."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PipelineError(f"cannot serve the UI on {host}:{port} ({error.strerror}); stop what uses the "
                                f"port (another `make ui`?) or choose another: `make ui PORT={port + 1}`") from None
    connect()
    # MLflow 3 opens an experiment on its GenAI overview; #/experiments/<id>/runs is the runs table.
    print(f"Training runs: http://{host}:{port}/#/experiments/{experiment_id()}/runs")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The MLflow UI's link to the training runs (`make ui`).")
    parser.add_argument("command", choices=["runs-url"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    arguments = parser.parse_args()
    guard("ui", runs_url, arguments.host, arguments.port)
