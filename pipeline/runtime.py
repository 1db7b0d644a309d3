"""What an entry point sets up before it runs: the stages (`python -m pipeline.<stage>`), the commands
(`python -m commands.<command>`), the tests and the bench. Importing this module changes nothing.

`python -m pipeline.train` imports the package before the module, so pipeline/__init__.py calls start()
there: the defaults below apply before TensorFlow or MLflow is imported, and a stage can run as a fork of
the warm process (commands/warm.py) before it pays those imports itself, or start one for the stages after it.
"""

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    """An entry point's first step: the defaults; for a stage, the checks of a DVC-run stage
    (under_dvc), then the hand-over to the warm process (which returns when the stage is to run here,
    after starting one in the background if none is up)."""
    apply_defaults()
    if module.startswith("pipeline."):
        if os.environ.get("DVC_STAGE"):  # DVC sets it for every stage command it runs
            under_dvc(module)
        from commands import warm

        warm.hand_over(module)


# The one `dvc repro` or `dvc exp run` that runs stages in this checkout, and when it started.
CHECKOUT_RUN_FILE = Path(".dvc/tmp/pipeline-run.json")
ONE_RUN_AT_A_TIME = (
    "run experiments one at a time in a checkout, or side by side with `dvc exp run --queue` (then "
    "`dvc queue start`) or `dvc exp run --temp`"
)
PARENT_POLL_SECONDS = 1.0  # how soon a stage notices that its dvc died
# The claim is read and written in milliseconds: a longer wait means its holder is stopped (Ctrl-Z) or
# stuck. Short, because DVC's process waits with the workspace's changes stashed (claim_checkout_to_compose).
CLAIM_WAIT_SECONDS = 5


def under_dvc(module: str) -> None:
    """A stage that DVC runs: one DVC process at a time in this checkout, on the params.yaml it started
    with (claim_checkout), and the stage stops when that process dies (stop_with).

    Both in the process DVC started: before a warm hand-over (its stand-in passes SIGTERM on to the
    stage's fork), or the stage itself. Nothing to do when no dvc process is among the ancestors.
    """
    import psutil

    dvc = next((process for process in psutil.Process().parents() if dvc_command(process)), None)
    if dvc is None:
        return
    from pipeline.errors import PipelineError, fail

    try:
        claim_checkout(dvc, composes_params=module == "pipeline.config")
    except PipelineError as error:
        fail({"pipeline.config": "params"}.get(module, module.removeprefix("pipeline.").replace("_", "-")), str(error))
    stop_with(dvc)


def dvc_command(process) -> str | None:
    """`dvc <arguments>` when the process is the dvc command (its script or `python -m dvc`), else None."""
    import psutil

    try:
        arguments = process.cmdline()
    except psutil.Error:
        return None
    for index, argument in enumerate(arguments[:3]):
        if os.path.basename(argument) == "dvc" and (index < 2 or arguments[1] == "-m"):
            return " ".join(["dvc", *arguments[index + 1 :]])
    return None


def claim_checkout(dvc, composes_params: bool = False) -> None:
    """Records `dvc` as the process running stages in this checkout, with params.yaml's digest;
    refuses when another live dvc holds the checkout, or when params.yaml changed since `dvc`'s
    first stage that reads it (composes_params: the `params` stage, which writes it, records none).
    With dvc None, only the refusal: nothing is recorded.

    DVC's own repository lock does not hold across a run: DVC releases it while a stage's command
    runs and for the whole of a workspace `dvc exp run` (unlocked_repo in dvc/stage/run.py and
    dvc/repo/experiments/__init__.py), so a second run in the same checkout starts and rewrites
    params.yaml and data under the first before any stage of its own runs. Queued (`--queue`) and
    `--temp` experiments run in copies of their own (.dvc/tmp/exps/...): this file is theirs alone.
    """
    import psutil

    from pipeline.errors import PipelineError

    CHECKOUT_RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
    ours = {"pid": dvc.pid, "started": dvc.create_time()} if dvc else {}
    with claim_lock():
        holder = checkout_run()
        if holder and (dvc is None or {key: holder.get(key) for key in ours} != ours):
            try:
                other = psutil.Process(holder["pid"])
                running = other.create_time() == holder["started"] and dvc_command(other)
            except (psutil.Error, KeyError, TypeError):
                running = None  # it has ended: the checkout is free
            if running:
                raise PipelineError(
                    f"`{running}` (pid {other.pid}) is running in this checkout, and two runs in one checkout "
                    f"overwrite each other's params.yaml and outputs; wait for it to end: {ONE_RUN_AT_A_TIME}"
                )
            holder = None
        if dvc is None:
            return
        if holder and holder.get("params") and (changed := params_changed()):
            raise PipelineError(changed)
        if not holder or not holder.get("params"):
            CHECKOUT_RUN_FILE.write_text(
                json.dumps({**ours, "params": None if composes_params else params_digest()}), encoding="utf-8"
            )


@contextmanager
def claim_lock() -> Iterator[None]:
    """The checkout's claim, one process at a time; one line if its holder keeps it (CLAIM_WAIT_SECONDS)."""
    from filelock import FileLock, Timeout

    from pipeline.errors import PipelineError

    lock = FileLock(f"{CHECKOUT_RUN_FILE}.lock")
    try:
        lock.acquire(timeout=CLAIM_WAIT_SECONDS)
    except Timeout:
        raise PipelineError(
            f"waited {CLAIM_WAIT_SECONDS} s for {lock.lock_file}, which another process holds (a stage or dvc "
            "stopped with Ctrl-Z, or stuck): resume or end it (`ps` shows it), then run again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def claim_checkout_to_compose() -> None:
    """Before conf/ is composed into params.yaml outside a stage: in DVC's own process for `dvc exp run`
    (hydra_plugins/), or by `make params`. Refused while another dvc run holds the checkout, before
    params.yaml is composed, and the run in progress keeps it. DVC composes inside its stash of the
    workspace's changes (BaseStashQueue._stash_exp in dvc/repo/experiments/queue/base.py), so tracked
    files the running experiment changed are at HEAD's version for that moment: a stage of it that
    starts then stops on params_changed rather than run on them. A workspace `dvc exp run` claims the
    checkout for its own process (its stages then find their own claim), so that one started after it
    is refused too. `--queue` and `--temp` experiments compose for a copy of their own: not refused."""
    if os.environ.get("DVC_STAGE"):
        return  # the `params` stage: under_dvc claimed the checkout for its dvc
    import psutil

    this = psutil.Process()
    if not dvc_command(this):
        claim_checkout(None)
    elif not {"--queue", "--temp"} & set(sys.argv):
        claim_checkout(this, composes_params=True)


def checkout_run() -> dict | None:
    """What claim_checkout recorded: {pid, started, params}, or None."""
    try:
        recorded = json.loads(CHECKOUT_RUN_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def params_digest() -> str:
    import hashlib

    from pipeline.config import PARAMS_FILE

    return hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest() if PARAMS_FILE.exists() else ""


def params_changed() -> str | None:
    """For a stage DVC runs: what is wrong when params.yaml is no longer the one its dvc run started
    its stages with (claim_checkout); None when it is, or when there is no record to compare with."""
    recorded = checkout_run() if os.environ.get("DVC_STAGE") else None
    if not recorded or not recorded.get("params") or recorded["params"] == params_digest():
        return None
    return (
        f"params.yaml changed while this dvc run (pid {recorded.get('pid')}) was running its stages (another "
        f"`dvc exp run` or `dvc repro` in this checkout, or an edit): {ONE_RUN_AT_A_TIME}"
    )


def stop_with(dvc) -> None:
    """Stops this process as Ctrl-C does (SIGTERM: the error guard's exit 130, a training's checkpoint
    kept, its MLflow run not finished, no output landed) when `dvc` dies, so that the next `dvc repro`
    resumes. A killed dvc does not stop its stage: without this the stage ran on and landed outputs
    that dvc.lock never recorded. Polled rather than PR_SET_PDEATHSIG: a shell may stand between dvc
    and the stage, and the kernel signal follows the thread that forked, not the process."""

    import psutil

    def alive() -> bool:
        try:  # is_running compares the start time too: a reused pid is not dvc
            return dvc.is_running() and dvc.status() != psutil.STATUS_ZOMBIE  # dead, not yet reaped
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()


# Written to file descriptor 2 while TensorFlow loads, before its log level applies (oneDNN's
# is about the default above, which reports/numerics.json records).
IMPORT_NOTICES = (
    "All log messages before absl::InitializeLog() is called",
    "cudart_stub.cc",
    "oneDNN custom operations are on",
)


@contextmanager
def skipped_optional_import(module: str) -> Iterator[None]:
    """Imports within it find `module` missing (None in sys.modules makes `import module` raise
    ImportError), as libraries that treat it as optional expect; later imports find it again."""
    if module in sys.modules:  # already imported (e.g. in the warm process): nothing to save
        yield
        return
    sys.modules[module] = None
    try:
        yield
    finally:
        if sys.modules.get(module, "") is None:
            del sys.modules[module]


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
