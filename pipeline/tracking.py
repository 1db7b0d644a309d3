"""MLflow tracking: where the store is, the one run each trained model owns, and its lineage.

train creates the run and writes its id to models/run.json; evaluate and error-analysis reopen it,
so everything about one model lands in one run. Stages that DVC restores from its run cache do not
execute and log nothing: their models/run.json still points at the run that made them.

The store is an input that can be wrong, like params.yaml: a deleted run or experiment, a file that
is no MLflow store, a store locked by another writer, a server that is down, dies mid-training or
refuses the request. Each becomes one PipelineError line naming the fix (store_faults); the
pipeline never deletes or rewrites anything in the store to recover.
"""

import functools
import logging
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import project_root, runtime
from pipeline.data_io import PREPARED_DIR, RUN_FILE, TRAINING_INPUTS, read_run_id
from pipeline.errors import ArgumentParser, PipelineError, guard, raise_if_interrupted

if TYPE_CHECKING:
    import mlflow

DEFAULT_EXPERIMENT = "mnist"
SERVER_TIMEOUT_SECONDS = 5
DATASET_DIGEST_CHARS = 16  # of a split's SHA-256 (MLflow's datasets table holds up to 36)
# What a run's commit must hold for `make reproduce RUN=` to rebuild it: the stages' code, conf/, the
# pipeline map and the environment. A run whose commit differs from the workspace in any is tagged dirty.
RESULT_INPUTS = (
    "pipeline",
    "conf",
    "dvc.yaml",
    *(path for path in TRAINING_INPUTS if not path.startswith("pipeline/")),
)


# The stores MLflow 3.17 writes: a SQLite file (the project's own, mlflow.db, and the tested one besides a
# tracking server), a tracking server, or another database of its SQLAlchemy store. File stores (file:, a
# bare path) it no longer writes.
STORE_SCHEMES = ("sqlite:///", "http://", "https://", "postgresql", "mysql", "mssql")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's own SQLite store; one line when it names no store we can use."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    if not uri.startswith(STORE_SCHEMES):
        raise PipelineError(
            f"MLFLOW_TRACKING_URI={uri} is not a tracking store this project can use: give sqlite:///<path to a "
            f"file> or a tracking server's http(s):// address, or unset it for the project's own store "
            f"(sqlite:///{project_root() / 'mlflow.db'})"
        )
    return uri


def is_server(uri: str) -> bool:
    """A tracking server (it chooses where artifacts go), rather than a local store."""
    return uri.startswith(("http://", "https://"))


def connect(existing: bool = False) -> str:
    """Points MLflow at the store after checking it: a server must answer (in seconds, not after
    minutes of retries), a SQLite file must be an MLflow store (MLflow would add its tables to any).

    existing: for a command that reads runs (compare, reproduce RUN=, serve, promote), a SQLite store
    that is not there is reported, not created empty (as MLflow would) for the command to find nothing in.
    """
    import mlflow

    # MLflow logs a store error with its traceback before raising it; store_faults' one line replaces both.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    uri = tracking_uri()
    if is_server(uri):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_SECONDS).close()
        except urllib.error.HTTPError as error:
            raise PipelineError(
                f"MLflow tracking server {uri} refused the request (HTTP {error.code} {error.reason}); "
                "check the URL, and the credentials or proxy in front of it"
            ) from None
        except OSError as error:
            reason = getattr(error, "reason", None) or error
            raise PipelineError(
                f"MLflow tracking server {uri} does not answer ({reason}); start it "
                "(`make server`) or unset MLFLOW_TRACKING_URI to use the local store"
            ) from None
        check_login(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if existing and no_sqlite_store(uri):
            raise PipelineError(
                f"no tracking store at {path} ({uri}), so no run to read; log runs first (`dvc repro`, "
                "`make sweep`), or point MLFLOW_TRACKING_URI at the store that holds them"
            )
        check_sqlite_store(path, uri)
        time_sqlite_statements()
        open_sqlite_store(path, uri)
    mlflow.set_tracking_uri(uri)
    return uri


def no_sqlite_store(uri: str) -> bool:
    """Whether `uri` names a SQLite store whose file is not there (or empty): MLflow would create it."""
    path = Path(uri.removeprefix("sqlite:///"))
    return uri.startswith("sqlite:///") and (not path.is_file() or path.stat().st_size == 0)


def open_sqlite_store(path: Path, uri: str) -> None:
    """Opens (and on first use creates) the store, one process at a time: MLflow's schema migrations,
    run by two processes at once on a new file (two queue workers, two `make tune` workers), fail."""
    import mlflow
    from filelock import FileLock

    if path.is_dir():
        return  # unopenable: store_faults reports it when MLflow tries
    with FileLock(f"{path}.lock"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # MLflow keeps the opened store


# When this thread's latest SQL statement started: how long a "database is locked" waited. MLflow's
# waits differ by call (busy_timeout 20 s in its sessions, sqlite3's default 5 s while it opens the
# store: mlflow/store/db/utils.py), so the error line prints the measured wait, not either figure.
statement_clock = threading.local()


def time_sqlite_statements() -> None:
    import sqlalchemy

    if not sqlalchemy.event.contains(sqlalchemy.engine.Engine, "before_cursor_execute", note_statement_start):
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", note_statement_start)


def note_statement_start(*_) -> None:
    statement_clock.started = time.monotonic()


def check_login(uri: str) -> None:
    """A server with authentication: the credentials MLflow will send must be accepted, before any work."""
    import base64

    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif username:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        )
    try:
        urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_SECONDS).close()
    except urllib.error.HTTPError as error:
        if error.code != 401:
            return  # anything else is for the request that meets it (store_faults)
        if not (username or os.environ.get("MLFLOW_TRACKING_TOKEN")):
            raise PipelineError(
                f"MLflow tracking server {uri} requires a login; set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        raise PipelineError(
            f"MLflow tracking server {uri} rejected the login of MLFLOW_TRACKING_USERNAME={username}; "
            "check MLFLOW_TRACKING_PASSWORD (or ask an admin to reset it)"
        ) from None
    except OSError:
        return  # it answered /health a moment ago; a failure now is store_faults' to report


def check_sqlite_store(path: Path, uri: str) -> None:
    fix = "move it aside (a new store is then created there) or point MLFLOW_TRACKING_URI at your store"
    if path.is_dir():  # MLflow would retry opening it for minutes before failing
        raise PipelineError(f"{path} is a folder, not an MLflow store; {fix}")
    if not path.exists() or path.stat().st_size == 0:
        return  # absent or empty: MLflow creates the store
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as database:
            tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        if "locked" in str(error):
            return  # a writer holds it: store_faults reports it if it stays locked
        raise PipelineError(f"{path} is not an MLflow store (SQLite: {error}); {fix}") from None
    if tables and "experiments" not in tables:
        raise PipelineError(
            f"{path} is a SQLite database but not an MLflow store (tables: {', '.join(sorted(tables)[:5])}); {fix}"
        )


def describe_store_fault(error: Exception, uri: str) -> str | None:
    """One line for a store fault the user can fix; None for anything else (a bug keeps its traceback)."""
    import mlflow

    text = " ".join(str(error).split())
    if "database is locked" in text:
        started = getattr(statement_clock, "started", None)
        waited = "SQLite gave up waiting" if started is None else f"SQLite waited {time.monotonic() - started:.1f} s"
        return (
            f"the tracking store {uri} stayed locked by another writer ({waited}); let the other "
            "process finish or stop it (another training? a queue worker?), then run again"
        )
    if "file is not a database" in text or "unable to open database file" in text:
        return f"cannot open the tracking store {uri} as an MLflow store ({text[:80]}); check the path and the file"
    if "out-of-date database schema" in text:  # MLflow words a newer store's schema the same way
        found = re.search(r"found version (\w+)", text)
        migrations = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
        if found and not any(migrations.glob(f"{found[1]}_*.py")):
            return (
                f"the tracking store {uri} was made by a newer MLflow than this environment's "
                f"({mlflow.__version__}, from requirements.lock); use that version, or another store"
            )
        return (
            f"the tracking store {uri} was made by an older MLflow; back it up, then upgrade it with "
            f"`mlflow db upgrade {uri}` (the pipeline never migrates a store itself)"
        )
    if "readonly database" in text:
        return f"the tracking store {uri} is read-only; make the file and its folder writable"
    status = re.search(r"error code (\d{3})", text) or re.search(r"\b(40[13]) Client Error", text)
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status and status[1] == "403" and username:
        return (
            f"MLflow tracking server {uri} refused the request (HTTP 403): MLFLOW_TRACKING_USERNAME={username} "
            "lacks the permission (logging a run needs EDIT on the experiment); ask its manager or an admin"
        )
    if status and status[1] in ("401", "403"):
        return (
            f"MLflow tracking server {uri} refused the request (HTTP {status[1]}); check the credentials "
            "or the proxy in front of it"
        )
    if re.search(r"Max retries exceeded|Connection refused|ConnectionError|Failed to establish", text):
        return (
            f"MLflow tracking server {uri} stopped answering ({text[:60]}...); nothing was finished: start it "
            "again and rerun `dvc repro` (a training resumes from its last completed epoch)"
        )
    return None


@contextmanager
def store_faults() -> Iterator[None]:
    """Turns the store faults a user can cause (describe_store_fault) into one PipelineError line."""

    try:
        yield
    except Exception as error:  # MlflowException, SQLAlchemy's and requests' errors, as MLflow raises them
        if isinstance(error, PipelineError):
            raise
        message = describe_store_fault(error, tracking_uri())
        if message is None:
            raise
        raise PipelineError(message) from None


def experiment_id() -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri()}; restore it "
            f"(`MLFLOW_TRACKING_URI={tracking_uri()} "
            f"mlflow experiments restore --experiment-id {experiment.experiment_id}`, or in the UI), or track into "
            "another experiment with MLFLOW_EXPERIMENT_NAME=<name>"
        )
    if experiment is None:
        # A local store keeps artifacts beside mlflow.db; a server chooses (and proxies) its own.
        location = None if is_server(tracking_uri()) else (project_root() / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=ui_tags())
        except MlflowException:  # a concurrent queue worker created it first
            pass
        experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id


def tag_for_the_ui(experiment: str) -> None:
    """Gives the experiment ui_tags when it lacks them or conf/experiment/ changed the view: a store made
    before them too. Trainings call it (they may edit the experiment); readers (compare, serve) never write."""
    import mlflow

    held = mlflow.get_experiment(experiment).tags
    for key, value in ui_tags().items():
        if key == VIEW_TAG and same_view(held.get(key), value):
            continue  # written before, with another time
        if held.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(experiment, key, value)


def same_view(held: str | None, wanted: str) -> bool:
    import json

    try:
        return json.loads(held)["state"] == json.loads(wanted)["state"]
    except (TypeError, ValueError, KeyError):
        return False


# MLflow 3's UI opens an experiment on the page its `mlflow.experimentKind` tag names: without it, it
# guesses, and a store with no traces gets the GenAI overview. custom_model_development is its kind for
# model training, opened on the runs table (ExperimentKind in mlflow/server/js: the experiment page's tabs).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The UI's saved views are experiment tags `mlflow.sharedViewState.<id>` holding the runs page's state as
# JSON (its Share button writes them; #/experiments/<id>/runs?viewStateShareKey=<id> opens one): which
# columns the table shows, its order, and the chart cards. The only place MLflow lets a project choose them.
VIEW_ID = "training-runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
TEST_ACCURACY = "test_accuracy"
# Training and validation of one metric on one chart: the UI draws one chart per metric name unless a
# line card lists several (selectedMetricKeys).
CURVES = {"accuracy": ("accuracy", "val_accuracy"), "loss": ("loss", "val_loss")}
# Metrics the view keeps off the charts (they stay in the table's column picker and on each run's
# page): without a card that names them, the UI adds one chart per metric, 13 here.
UNCHARTED = (
    "val_accuracy",
    "val_loss",
    "epoch_seconds",
    "samples_per_second",
    "test_loss",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc_ovr",
)


def varied_params() -> list[str]:
    """The params the presets of conf/experiment/ change (a preset's model swap is model.name), the
    data subset and the seed: the columns that tell this project's runs apart."""
    import yaml

    from pipeline.config import CONF_DIR

    keys = {"model.name", "data.limit", "train.seed"}
    for preset in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        for section, values in (yaml.safe_load(preset.read_text(encoding="utf-8")) or {}).items():
            if isinstance(values, dict):
                keys.update(f"{section}.{key}" for key in values)
    # The table shows its columns in this order and renders only those in the window's width: train's first.
    return sorted(keys, key=lambda key: (["train", "model", "data"].index(key.partition(".")[0]), key))


def runs_view() -> dict:
    """The runs page's saved view: the table's columns and order, and the charts (see VIEW_TAG)."""
    import json

    params = varied_params()

    def card(kind: str, uuid: str, **fields) -> dict:
        return {"type": kind, "uuid": uuid, "metricSectionId": "results", "isGenerated": False, "deleted": False,
                "runsCountToCompare": 10, **fields}  # fmt: skip

    curves = [
        card(
            "LINE",
            f"curve-{name}",
            metricKey=keys[0],
            selectedMetricKeys=list(keys),
            xAxisKey="step",
            useGlobalXaxisKey=False,
            scaleType="linear",
            xAxisScaleType="linear",
            lineSmoothness=0,
            useGlobalLineSmoothing=False,
            range={},
        )
        for name, keys in CURVES.items()  # MLflow titles such a card "accuracy vs val_accuracy"
    ]
    charts = [
        card("BAR", "test-accuracy", displayName="test accuracy", metricKey=TEST_ACCURACY),
        card(
            "PARALLEL",
            "params-to-accuracy",
            displayName="parameters and test accuracy",
            selectedParams=[key for key in params if key not in ("model.name", "data.limit")],
            selectedMetrics=[TEST_ACCURACY],
            showAllRuns=True,
        ),
        *curves,
        card("BAR", "fit-seconds", displayName="fit time (s)", metricKey="fit_seconds"),
        *(card("BAR", f"off-{key}", metricKey=key, deleted=True) for key in UNCHARTED),
    ]
    state = {
        "orderByKey": f"metrics.`{TEST_ACCURACY}`",
        "orderByAsc": False,
        "selectedColumns": [f"metrics.`{TEST_ACCURACY}`", *(f"params.`{key}`" for key in params)],
        "compareRunCharts": charts,
        "compareRunSections": [
            {"uuid": "results", "name": "Results", "display": True, "isReordered": True, "deleted": False}
        ],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }
    now = int(time.time() * 1000)  # the UI lists saved views with their times (milliseconds)
    return {"name": "Training runs", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}


def ui_tags() -> dict[str, str]:
    import json

    return {**EXPERIMENT_KIND, VIEW_TAG: json.dumps(runs_view(), sort_keys=True)}


def git(*arguments: str, check: bool = False) -> str:
    """git's output; "" when it fails (outside a repository, say), or PipelineError with check."""
    try:
        result = subprocess.run(["git", *arguments], capture_output=True, text=True)
    except FileNotFoundError:
        raise PipelineError(
            "git is not installed (or not on PATH): the pipeline records each result's "
            "commit; install git (e.g. `apt-get install git`)"
        ) from None
    if result.returncode != 0 and check:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise PipelineError(f"git {' '.join(arguments)}: {reason}")
    return result.stdout.strip() if result.returncode == 0 else ""


def check_git_identity() -> None:
    """Before `dvc exp run`: DVC stashes the workspace as a git commit, and without a git identity it fails
    with "unexpected error - Git user name and email must be configured" (scmrepo's pygit2 backend)."""
    unset = [
        key
        for key, variable in (("user.name", "GIT_COMMITTER_NAME"), ("user.email", "GIT_COMMITTER_EMAIL"))
        if not (os.environ.get(variable) or git("config", key))
    ]
    if unset:
        raise PipelineError(
            f"git has no {' and no '.join(unset)} here, and `dvc exp run` records each experiment as a git "
            'commit; set them: git config --global user.name "Your Name"; '
            "git config --global user.email you@example.com"
        )


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

    # Every .metadata (and .version) parses METADATA anew: read once per package.
    return "\n".join(sorted("{Name}=={Version}".format_map(dist.metadata) for dist in distributions())) + "\n"


GPU_METRICS_TAG, GPU_METRICS_MISSING_TAG = "gpu.metrics", "gpu.metrics.missing"


@functools.cache
def gpu_metrics(tensorflow_gpus: int, tensorflow_build: str) -> dict[str, str]:
    """Which GPU metrics a training run records, as its tags: gpu.metrics is `system` (MLflow's
    system/gpu_* metrics: utilisation, memory, power, read through NVML), `training` (the train stage's
    per-epoch device memory from TensorFlow), both, or `none`; gpu.metrics.missing says why one is not.

    Builds MLflow's own GPU monitor, as its system-metrics sampler does when the run starts
    (SystemMetricsMonitor._initialize_gpu_monitor), and reads why it fails: that sampler only says
    "Skip logging GPU metrics" at INFO level.
    """
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    recorded, missing = [], []
    try:
        if GPUMonitor().num_gpus:
            recorded.append("system")
        else:
            missing.append("no GPU: NVML lists none")
    except ImportError:
        missing.append("no NVML: nvidia-ml-py is not installed, only the GPU lock (requirements-gpu.lock) has it")
    except Exception as error:  # RuntimeError from the monitor, NVML's own error as its context
        cause = type(error.__context__).__name__
        if cause == "NVMLError_LibraryNotFound":
            missing.append("no GPU: no NVIDIA driver (NVML's library libnvidia-ml.so is not found)")
        else:
            missing.append(f"driver error: NVML does not start ({error.__context__ or error})")
    if tensorflow_gpus:
        recorded.append("training")
    else:
        missing.append(f"no GPU: TensorFlow ({tensorflow_build} build) sees none")
    tags = {GPU_METRICS_TAG: ",".join(recorded) or "none"}
    if missing:
        tags[GPU_METRICS_MISSING_TAG] = "; ".join(missing)
    return tags


@contextmanager
def training_run(
    run_name: str, params: dict, tags: dict, continue_run_id: str | None = None
) -> Iterator["mlflow.ActiveRun"]:
    """Starts the model's run (with system metrics); the caller records its id in models/run.json.

    continue_run_id reopens an interrupted training's run, so a resumed training stays one run.
    On an exception the run is closed as FAILED, never left RUNNING (when the store still answers).
    """
    import mlflow

    with store_faults():
        connect()
        experiment = experiment_id()
        tag_for_the_ui(experiment)
        # Short runs need frequent samples to show anything; the sampler thread costs ~nothing.
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
        if continue_run_id and run_state(continue_run_id) != "active":
            print(
                f"tracking: the interrupted training's run {continue_run_id} is gone or deleted; "
                "continuing in a new run",
                file=sys.stderr,
            )
            continue_run_id = None
        with mlflow.start_run(
            run_id=continue_run_id,
            experiment_id=None if continue_run_id else experiment,
            run_name=None if continue_run_id else run_name,
            tags={**lineage_tags(), "env.python": platform.python_version(), **tags},
            log_system_metrics=True,
        ) as run:
            # A killed experiment's run, resumed by `dvc repro`: that experiment's name is not its own.
            resumed_from_experiment = continue_run_id and "dvc.exp_name" in mlflow.get_run(continue_run_id).data.tags
            if resumed_from_experiment and not os.environ.get("DVC_EXP_NAME"):
                mlflow.delete_tag("dvc.exp_name")
            mlflow.log_params(params)
            mlflow.log_text(installed_packages(), "environment/requirements.txt")
            yield run
            raise_if_interrupted()
            check_run_is_ours(run.info.run_id)


def check_run_is_ours(run_id: str) -> None:
    """Fails the run (FAILED, outputs not landed) unless params.yaml and the DVC experiment are still
    the ones it was logged under.

    Two `dvc repro` or `dvc exp run` in one checkout at once (pipeline/runtime.py's claim_checkout
    refuses the second, but DVC rewrites params.yaml before any stage runs, and with more than one
    workspace experiment queued it may start either's) would otherwise finish a run under another
    command's experiment name or params. Checked last, just before the run is marked FINISHED.
    """
    import mlflow

    from pipeline.config import PARAMS_FILE, flatten, load

    if changed := runtime.params_changed():
        raise PipelineError(f"{changed}; MLflow run {run_id} is marked FAILED")
    run = mlflow.get_run(run_id)
    ours, tagged = os.environ.get("DVC_EXP_NAME"), run.data.tags.get("dvc.exp_name")
    if ours and tagged != ours:
        raise PipelineError(
            f"MLflow run {run_id} was logged for DVC experiment {tagged or '(none)'}, not for this one ({ours}), "
            f"so it is marked FAILED: {runtime.ONE_RUN_AT_A_TIME}"
        )
    on_disk = {key: str(value) for key, value in flatten(load()).items()}
    changed = sorted(key for key, value in run.data.params.items() if key in on_disk and on_disk[key] != value)
    if changed:
        differences = ", ".join(f"{key} {run.data.params[key]} -> {on_disk[key]}" for key in changed[:3])
        raise PipelineError(
            f"{PARAMS_FILE} does not hold the params MLflow run {run_id} was logged with ({differences}), so the "
            f"run is marked FAILED: run `dvc repro` to train on {PARAMS_FILE}, and {runtime.ONE_RUN_AT_A_TIME}"
        )


def run_state(run_id: str) -> str:
    """ "active", "deleted", or "missing" (not in this store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id).info.lifecycle_stage
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "missing"
        raise


@contextmanager
def model_run() -> Iterator["mlflow.ActiveRun"]:
    """Reopens the run of the model in models/run.json, for evaluate and error-analysis.

    Only while params.yaml is still the one this dvc run started with, checked after models/run.json is
    read: a `dvc exp apply` or `dvc checkout` between two stages puts back another model's run.json
    (after params.yaml), and its run, finished long ago, must not be reopened, logged into and failed.
    """
    import mlflow

    run_id = read_run_id()
    if changed := runtime.params_changed():
        raise PipelineError(f"{changed}; MLflow run {run_id} (from {RUN_FILE}) is left as it was")
    if no_sqlite_store(uri := tracking_uri()):
        raise PipelineError(
            f"MLflow run {run_id} (from {RUN_FILE}) cannot be in {uri}: there is no store there; point "
            "MLFLOW_TRACKING_URI at the store that holds it, or retrain with `dvc repro --force train`"
        )
    with store_faults():
        uri = connect()
        state = run_state(run_id)
        if state == "missing":
            raise PipelineError(
                f"MLflow run {run_id} (from {RUN_FILE}) is not in the store {uri}; point "
                "MLFLOW_TRACKING_URI at the store that holds it, or retrain with `dvc repro --force train`"
            )
        if state == "deleted":
            raise PipelineError(
                f"MLflow run {run_id} (from {RUN_FILE}) is deleted in {uri}; restore it "
                f"(`MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {run_id}`, or in the UI), "
                "or retrain into a new run with `dvc repro --force train`"
            )
        with mlflow.start_run(run_id=run_id) as run:
            yield run
            check_run_is_ours(run_id)


def log_dataset(split: str, images, labels, manifest: dict) -> None:
    """A data split as an MLflow dataset input: what the runs table's Dataset column shows and filters.

    Its digest is the split's SHA-256 from preprocess (the manifest), so two runs show the same
    digest exactly when they saw the same images and labels. MLflow's own digest (from_numpy without
    `digest=`) hashes only the first 10,000 values, and copies the whole array to get them
    (compute_numpy_digest in mlflow/data/digest_utils.py), a copy as large as the split.
    """
    import warnings

    import mlflow
    import numpy as np

    with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source twice, and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_numpy(
            np.asarray(images),
            targets=np.asarray(labels),
            name=f"mnist-{split}",
            source=str((PREPARED_DIR / f"{split}_images.npy").resolve()),
            digest=manifest["splits"][split]["sha256"][:DATASET_DIGEST_CHARS],
        )
    mlflow.log_input(dataset, context=split, tags={"data.hash": manifest["data_hash"]})


def log_artifacts(paths: list[Path], artifact_path: str) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    print(f"tracking: logged {len(paths)} artifacts to run {mlflow.active_run().info.run_id}", file=sys.stderr)


def check_port_free(host: str, port: int, what: str, target: str) -> None:
    """Before a server starts (`make ui`, `make serve`): one line when it could not listen on host:port."""
    import socket

    if not 0 < port < 65536:
        raise PipelineError(f"PORT must be between 1 and 65535, got {port}")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PipelineError(
                f"cannot serve {what} on {host}:{port} ({error.strerror}); stop what uses the "
                f"port (another `make {target}`?) or choose another: `make {target} PORT={port + 1}`"
            ) from None


@store_faults()
def runs_url(host: str, port: int) -> str:
    """`make ui`, before starting the UI: checks that the port is free; the runs table's link."""
    check_port_free(host, port, "the UI", "ui")
    connect()
    return f"Training runs: http://{host}:{port}/{runs_path(experiment_id())}"


def runs_path(experiment: str) -> str:
    """The runs page in the project's saved view (runs_view): best test accuracy first, the params that vary.

    workflowType: MLflow 3.17's sidebar follows a per-browser toggle (GenAI or Model training, kept in
    the browser's storage, GenAI unless switched) that the experiment's kind does not override; the
    URL's parameter does, for this page.
    """
    return f"#/experiments/{experiment}/runs?viewStateShareKey={VIEW_ID}&workflowType=machine_learning"


# What `mlflow ui` says that is no error: each worker's warning that a Starlette module MLflow imports is
# deprecated (mlflow/server/fastapi_app.py: starlette.middleware.wsgi), and its note that the default host
# checks are on. Uvicorn's and MLflow's INFO lines are held back by their own
# log-level settings (UI_QUIET_ARGS, MLFLOW_LOGGING_LEVEL).
UI_NOT_ERRORS = ("[MLflow] Security middleware enabled with default settings",)
UI_WARNING_FILTER = "ignore:starlette.middleware.wsgi is deprecated"
UI_QUIET_ARGS = ("--uvicorn-opts", "--log-level warning --no-access-log")
# MLflow's job runner (GenAI prompt optimization, scorers, trace archival: nothing this project uses) is a
# process and a pool of workers that run code on the server's behalf, and slows its start and stop; both
# `make ui` and `make server` leave it off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true says otherwise.
JOB_RUNNER_SWITCH = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
UI_STOP_SECONDS = 20  # for the server's own graceful stop, before its process group is killed


def serve_ui(host: str, port: int, command: list[str]) -> int:
    """`make ui`: runs `command` (mlflow ui ...) and prints the runs table's link once the server answers.

    Its terminal keeps that line and what the server reports as a problem; a click on the link works.
    """
    import threading
    import time

    link = runs_url(host, port)
    environment = dict(os.environ)
    environment.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    environment.setdefault(*JOB_RUNNER_SWITCH)
    environment["PYTHONWARNINGS"] = ",".join(filter(None, [environment.get("PYTHONWARNINGS"), UI_WARNING_FILTER]))
    # In a session of its own: the terminal's Ctrl-C reaches this process alone, which stops the server
    # (mlflow passes the SIGTERM on to its workers), rather than every worker at once, mid-import or not.
    server = subprocess.Popen(
        [*command, *UI_QUIET_ARGS], env=environment, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    stopping = threading.Event()

    def forward_errors() -> None:
        for line in server.stderr:
            if not stopping.is_set() and not line.startswith(UI_NOT_ERRORS):
                sys.stderr.write(line)
                sys.stderr.flush()

    threading.Thread(target=forward_errors, daemon=True).start()
    loopback = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    health = f"http://{'[' + loopback + ']' if ':' in loopback else loopback}:{port}/health"
    try:
        while server.poll() is None:
            try:
                urllib.request.urlopen(health, timeout=2).close()
                print(link, flush=True)
                break
            except OSError:
                time.sleep(0.5)
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C (or a SIGTERM, see guard): the server stops with this command
        stopping.set()  # what it prints while it stops is no news
        server.terminate()
        try:
            server.wait(timeout=UI_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # with every worker it started
            server.wait()
        return 130


if __name__ == "__main__":
    parser = ArgumentParser(
        description="`make ui`: the MLflow UI, and its link to the training runs.",
        epilog="ui runs the server command given after --, and prints the link once it answers.",
    )
    parser.add_argument("command", choices=["runs-url", "ui"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    own = sys.argv[1:]
    server = own[own.index("--") + 1 :] if "--" in own else []
    arguments = parser.parse_args(own[: len(own) - len(server) - (1 if server else 0)])
    if arguments.command == "runs-url":
        guard("ui", lambda: print(runs_url(arguments.host, arguments.port)))
    elif not server:
        parser.error("ui needs the server's command after --")
    else:
        guard("ui", lambda: sys.exit(serve_ui(arguments.host, arguments.port, server)))
