"""`make serve`, `make promote`: from a tracked run to a model people use.

serve: MLflow's model server for a logged model (RUN=<run id>, MODEL=<models:/... URI>, default the
latest finished training run) on 127.0.0.1; POST images to /invocations, get class probabilities.
promote: registers a run's model in the Model Registry as REGISTERED_MODEL and moves the `champion`
alias to that version, so `make serve MODEL=models:/mnist-classifier@champion` serves the best.
example: the JSON body of one test image (data/prepared), for curl.
"""

import json
import os
import sys

import mlflow
import numpy as np

from pipeline import numerics, tracking
from pipeline.data_io import load_split
from pipeline.errors import ArgumentParser, PipelineError, guard

REGISTERED_MODEL = "mnist-classifier"
TEST_ACCURACY = tracking.TEST_ACCURACY
ALIAS = "champion"


def latest_training_run() -> str:
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        output_format="list",
        max_results=1,
        filter_string="attributes.status = 'FINISHED' and metrics.test_accuracy >= 0",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise PipelineError(
            f"no finished, evaluated training run in {tracking.tracking_uri()}; "
            "train one with `make run`, or name one with RUN=<run id>"
        )
    return runs[0].info.run_id


def model_uri(run_id: str | None, model: str | None) -> str:
    """The logged model to serve: MODEL as given, RUN's model, or the latest training run's."""
    if run_id and model:
        raise PipelineError("give RUN=<run id> or MODEL=<models:/... URI>, not both")
    if model:
        return model
    return logged_model(run_id or latest_training_run()).model_uri


def logged_model(run_id: str) -> "mlflow.entities.LoggedModel":
    """The model a training run logged. MLflow 3 keeps it as a LoggedModel (models:/<model id>), not
    among the run's artifacts: runs:/<id>/model still resolves, with a warning that it has no artifacts."""
    if tracking.run_state(run_id) != "active":
        raise PipelineError(f"no run {run_id} in {tracking.tracking_uri()} (or it is deleted)")
    run = mlflow.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        output_format="list",
    )
    if not models:
        raise PipelineError(
            f"run {run_id} logged no model (a failed or interrupted training?); choose a finished training "
            "run (`make ui` lists them)"
        )
    return models[0]


SERVE_ANOTHER = (
    "serve a finished training run's model (`make serve RUN=<run id>`, `make ui` lists them), or register one "
    "first (`make promote RUN=<run id>`)"
)
PROMOTE_ANOTHER = "promote another run (`make ui` lists them), or train a new one with `dvc repro --force train`"


def check_loadable(uri: str, fix: str) -> None:
    """One line when MLflow cannot find the model at `uri` (a registered name or alias that is not
    there, files gone from the artifact store), before a server or the registry is pointed at it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.models.get_model_info(uri)
    except MlflowException as error:
        raise PipelineError(f"no model to load at {uri} ({' '.join(error.message.split())}); {fix}") from None


@tracking.store_faults()
def serve(run_id: str | None, model: str | None, host: str, port: int) -> None:
    tracking.check_port_free(host, port, "the model", "serve")
    tracking.connect(existing=True)
    uri = model_uri(run_id, model)
    check_loadable(uri, SERVE_ANOTHER)
    print(f"serve: {uri} on http://{host}:{port}/invocations (Ctrl-C stops it)", file=sys.stderr)
    sys.stdout.flush()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The environment is this venv's (--env-manager local): the model was trained with it.
    os.execvp(
        "mlflow",
        [
            "mlflow",
            "models",
            "serve",
            "--model-uri",
            uri,
            "--env-manager",
            "local",
            "--host",
            host,
            "--port",
            str(port),
        ],
    )


@tracking.store_faults()
def promote(run_id: str | None) -> None:
    if not run_id:
        raise PipelineError("name the run to promote: `make promote RUN=<run id>` (`make ui` lists them)")
    tracking.connect(existing=True)
    if tracking.run_state(run_id) != "active":
        raise PipelineError(f"no run {run_id} in {tracking.tracking_uri()} (or it is deleted)")
    model = logged_model(run_id)
    run = mlflow.get_run(run_id)
    if TEST_ACCURACY not in run.data.metrics:
        raise PipelineError(
            f"run {run_id} has no test accuracy (evaluate did not finish in it); promote an evaluated run, "
            "or finish this one with `dvc repro`"
        )
    check_loadable(model.model_uri, PROMOTE_ANOTHER)
    version = mlflow.register_model(model.model_uri, REGISTERED_MODEL, tags=version_tags(run))
    client = mlflow.MlflowClient()
    client.update_model_version(REGISTERED_MODEL, version.version, description=version_description(run))
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version.version)
    print(
        f"promote: run {run_id} is {REGISTERED_MODEL} version {version.version}, alias @{ALIAS}; "
        f"serve it with `make serve MODEL=models:/{REGISTERED_MODEL}@{ALIAS}`",
        file=sys.stderr,
    )


def version_tags(run: "mlflow.entities.Run") -> dict[str, str]:
    """What a model version carries from its run: commit, data, and the numeric environment that made
    its weights (`make reproduce RUN=` checks against it)."""
    keep = ("git.commit", "git.dirty", "data.hash", "config.hash", "model.name", numerics.TAG_PREFIX)
    tags = {key: value for key, value in run.data.tags.items() if key.startswith(keep)}
    return {**tags, "test_accuracy": f"{run.data.metrics[TEST_ACCURACY]:.4f}"}


def version_description(run: "mlflow.entities.Run") -> str:
    """Markdown the model version page shows: test accuracy, the run (a link inside the UI), what it was trained on."""
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    return (
        f"Test accuracy **{metrics[TEST_ACCURACY]:.2%}** ({metrics[TEST_ACCURACY]}) on "
        f"{'the official 10,000 test images' if params.get('data.limit') in (None, 'None') else 'a subset'}, "
        f"from run [{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}) "
        f"(`{run.info.run_id}`).\n\n"
        f"Commit `{tags.get('git.commit', 'unknown')}`"
        f"{' with uncommitted changes' if tags.get('git.dirty') != 'false' else ''}, "
        f"data hash `{tags.get('data.hash', 'unknown')}`; the numeric environment is in the tags `numerics.*`."
    )


def example(index: int) -> None:
    images, labels = load_split("test")
    if not 0 <= index < len(labels):
        raise PipelineError(f"--index must be between 0 and {len(labels) - 1}, got {index}")
    print(json.dumps({"inputs": np.asarray(images[index : index + 1]).round(4).tolist()}))
    print(f"example: test image {index}, a {labels[index]}", file=sys.stderr)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve a logged model (default: the latest training run's)")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=5001)
    chosen = serving.add_mutually_exclusive_group()
    chosen.add_argument("--run", help="the MLflow run id whose model to serve")
    chosen.add_argument("--model", help="a registered model URI, e.g. models:/mnist-classifier@champion")
    promoting = commands.add_parser("promote", help="register a run's model and point the champion alias at it")
    promoting.add_argument("--run", help="the MLflow run id (default: the latest training run)")
    one = commands.add_parser("example", help="one test image as the server's JSON input")
    one.add_argument("--index", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.command == "serve":
        guard("serve", serve, arguments.run, arguments.model, arguments.host, arguments.port)
    elif arguments.command == "promote":
        guard("promote", promote, arguments.run)
    else:
        guard("example", example, arguments.index)


if __name__ == "__main__":
    main()
