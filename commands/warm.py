"""The warm process: one resident process that has already imported what the stages import
(TensorFlow, Keras, MLflow and its SQLite store, scikit-learn, pandas, matplotlib, Hydra), so that each
stage `dvc repro` or `dvc exp run` starts runs as a fork of it instead of paying those imports again
(the bulk of a quick experiment's time on a small machine; `make bench` measures it).

The first stage that finds none starts one in the background and runs in its own process as before
(one line says so); the stages after it run as forks. PIPELINE_WARM=0 turns that off for good,
PIPELINE_WARM=1 on where it is off by default (under CI and pytest); `make warm` starts one and waits
until it is ready, `make cold` stops it.

The stage commands stay `python -m pipeline.<stage>`: pipeline/__init__.py calls hand_over(), which
sends the stage's module, arguments, working directory, environment and terminal (its file
descriptors) over a Unix socket. The fork imports the pipeline's own modules fresh from that
directory, so it runs the code on disk; its exit status is the stage's, and Ctrl-C reaches it. A
stage runs in its own process as before when no warm process is up, when the one that is up does not
answer, ends during the stage, or was started with other packages, another interpreter, or other
values of the variables the preloaded libraries read while importing (TF_*, ONEDNN_*, ...): those are
fixed in it by then, so it is replaced by one started in the stage's environment.

The socket lives in a folder only its owner can open, and each side checks the other's user.
"""

import argparse
import atexit
import fcntl
import gc
import hashlib
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from pathlib import Path

from pipeline import project_root
from pipeline.data_io import TRAINING_INPUTS

# One warm process per project (queued experiments find theirs through DVC_ROOT): its pid and log in
# DVC's scratch folder, its socket in a folder of this user's that only they can open, as tmux does,
# with a path short enough for a Unix socket (107 bytes) wherever the project lies.
FOLDER = project_root() / ".dvc" / "tmp" / "warm"
PID_FILE = FOLDER / "pid"
LOG_FILE = FOLDER / "log"
# Held by the warm process from its start to its end (the kernel lets go when it dies): a stage that
# cannot take it leaves the starting to the one that did, so two stages never start two processes.
LOCK_FILE = FOLDER / "lock"
SOCKETS = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"mnist-pipeline-{os.getuid()}"
SOCKET = SOCKETS / hashlib.sha256(os.fsencode(project_root().resolve())).hexdigest()[:16]
# The modules DVC runs (dvc.yaml): what they import at the top is what the warm process preloads.
STAGES = (
    "pipeline.config",
    "pipeline.download",
    "pipeline.preprocess",
    "pipeline.train",
    "pipeline.evaluate",
    "pipeline.error_analysis",
)
# Imported by the stages only when needed, but by every run.
LATER_IMPORTS = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.keras", "matplotlib.pyplot")
IDLE_MINUTES = 30
# How long a stage waits for each of the warm process's answers until its fork runs (then as long as
# the stage takes) before running on its own: answering takes a fork and a few messages; a warm
# process that takes longer is stuck.
ANSWER_SECONDS = 10
# PIPELINE_WARM=0 or 1: whether a stage that finds no warm process starts one. Unset: yes, except under
# CI or pytest (https://docs.pytest.org/en/stable/example/simple.html#pytest-current-test-environment-variable),
# where no user runs a next experiment, and a process left behind would only hold memory.
SWITCH = "PIPELINE_WARM"
SWITCH_VALUES = {"0": False, "1": True}
# Variables that the preloaded libraries read while importing: a fork cannot take other values.
IMPORT_TIME_VARIABLES = (
    "TF_",
    "KERAS_",
    "ONEDNN_",
    "DNNL_",
    "MKL",
    "KMP_",
    "OMP_",
    "OPENBLAS_",
    "CUDA",
    "NVIDIA_",
    "XLA_",
    "LD_",
    "PYTHON",
    "MPL",
    "MLFLOW_",
    "XDG_",
    "HOME",
)
# Whether Python writes bytecode files changes no module: the Makefile clears it for make's commands
# (it compiles none at install), and a typed `dvc exp run` keeps the shell's.
IGNORED_VARIABLES = {"PYTHONDONTWRITEBYTECODE"}


def process_fingerprint() -> dict:
    """What a stage's process must share with the warm process to run as a fork of it."""
    return {
        "Python": [sys.version, os.path.realpath(sys.prefix)],  # the venv, whichever link leads to it
        "installed packages": installed_distributions(sysconfig.get_paths()["purelib"]),
        # The environment half of what shapes the weights (the code half is imported fresh by each fork).
        "locks": hashlib.sha256(
            b"".join(
                (project_root() / path).read_bytes()
                for path in TRAINING_INPUTS
                if not path.endswith(".py") and (project_root() / path).exists()
            )
        ).hexdigest(),
        "variables": {
            key: value
            for key, value in os.environ.items()
            if key.startswith(IMPORT_TIME_VARIABLES) and key not in IGNORED_VARIABLES
        },
    }


def installed_distributions(site_packages: str) -> str:
    """A digest of the distributions installed in site_packages, each with the time pip wrote its
    .dist-info: installing, upgrading, reinstalling or removing one changes it. Not the folder's own
    time, which Python's first bytecode write (site-packages/__pycache__) changes too."""
    with os.scandir(site_packages) as entries:
        found = sorted(
            f"{entry.name} {entry.stat().st_mtime_ns}" for entry in entries if entry.name.endswith(".dist-info")
        )
    return hashlib.sha256("\n".join(found).encode()).hexdigest()


class Cold(Exception):
    """The warm process cannot run this stage: why, and whether to replace it."""

    def __init__(self, reason: str, replace: bool = True, stuck: bool = False):
        super().__init__(reason)
        self.replace, self.stuck = replace, stuck


def starts_by_default(stage: str) -> bool:
    """Whether a stage that finds no warm process starts one (SWITCH says why)."""
    value = os.environ.get(SWITCH, "")
    if value in SWITCH_VALUES:
        return SWITCH_VALUES[value]
    if value:
        sys.exit(
            f"error: {stage}: {SWITCH}={value} is neither 0 (stages never start a warm process) nor 1 "
            "(the first stage that finds none starts one); set one of them, or unset it"
        )
    return os.environ.get("CI", "").lower() in ("", "0", "false") and "PYTEST_CURRENT_TEST" not in os.environ


def hand_over(module: str) -> None:
    """Runs this `python -m <module>` as a fork of the warm process and exits with its status;
    returns, for the module to run here, when there is no warm process that can: after starting
    one in the background, unless PIPELINE_WARM=0 (or CI, or pytest) says not to."""
    if module not in STAGES:
        return
    stage = module.removeprefix("pipeline.")
    automatic = starts_by_default(stage)
    try:
        status = run_as_fork(module)
    except Cold as cold:
        if automatic and cold.replace:
            end_process(open_process(warm_pid()), signal.SIGKILL if cold.stuck else signal.SIGTERM)
            started = start_in_background()
            if started:
                cold = f"{cold}: replaced by one started here (pid {started.pid})"
        elif cold.replace:
            cold = f"{cold} (`make cold`, then `make warm`, replaces it)"
        print(f"warm: {cold}; this stage runs in its own process", file=sys.stderr)
        return
    if status is None:
        started = start_in_background() if automatic else None
        if started:
            print(
                f"warm: started a process with TensorFlow, MLflow & co. imported (pid {started.pid}, log "
                f"{LOG_FILE.relative_to(project_root())}): the next stages run as its forks; `make cold` stops it, "
                f"{SWITCH}=0 starts none",
                file=sys.stderr,
            )
        return
    if status < 0:  # the stage died of a signal: so does its stand-in
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


def run_as_fork(module: str) -> int | None:
    """The exit status of this stage run as a fork of the warm process; None when none is up.
    Raises Cold when the warm process cannot run it; the stage has not run then (or was ended)."""
    if not SOCKET.exists() or not private(SOCKETS):
        return None
    connection = socket.socket(socket.AF_UNIX)
    connection.settimeout(ANSWER_SECONDS)
    try:
        connection.connect(str(SOCKET))
    except TimeoutError:
        raise Cold(f"the warm process did not answer in {ANSWER_SECONDS} s", stuck=True) from None
    except OSError:
        return None  # a warm process that ended without removing its socket
    if peer_uid(connection) != os.getuid():
        return None
    request = {
        "module": module,
        "arguments": sys.argv[1:],
        "directory": os.getcwd(),
        "environment": dict(os.environ),
        "fingerprint": process_fingerprint(),
    }
    answers = connection.makefile("r")
    try:
        connection.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(answers.readline() or '{"cold": "the warm process did not answer"}')
    except TimeoutError:
        raise Cold(f"the warm process did not answer in {ANSWER_SECONDS} s", stuck=True) from None
    except OSError:
        raise Cold("the warm process did not answer") from None  # it closed the connection
    if "cold" in answer:
        raise Cold(answer["cold"])
    supervisor = open_process(answer["streams"])
    try:
        socket.send_fds(connection, [b"\n"], [0, 1, 2])
        answer = json.loads(answers.readline() or '{"cold": "the warm process did not answer"}')
    except TimeoutError:
        end_process(supervisor, signal.SIGKILL)  # with it go the streams it took
        raise Cold(f"the warm process did not answer in {ANSWER_SECONDS} s", stuck=True) from None
    except OSError:
        end_process(supervisor)
        # e.g. a closed standard stream, which cannot be passed on
        raise Cold("the warm process could not take this stage's streams", replace=False) from None
    if supervisor is not None:
        os.close(supervisor)
    if "cold" in answer:
        raise Cold(answer["cold"])
    connection.settimeout(None)  # a stage takes as long as it takes
    stage = open_process(answer["pid"])  # now, while the fork that watches it has not reaped it
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, kill, a closed terminal
        signal.signal(number, lambda number, _: os.kill(answer["pid"], number))
    ended = json.loads(answers.readline() or "{}")
    if "exit" in ended:
        return ended["exit"]
    # The fork that watched the stage is gone (killed with the warm process's group, say): end the
    # stage if it still runs, and run it here from the start (its outputs land only when it succeeds).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    end_process(stage)
    raise Cold("the warm process ended during this stage")


def open_process(pid: int | None) -> int | None:
    """A pidfd of the process, which stays its own even if the pid is reused; None if it is gone."""
    try:
        return None if pid is None else os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def end_process(process: int | None, first: signal.Signals = signal.SIGTERM) -> None:
    """Ends a process (its pidfd, which this closes; None: gone already) and waits until it has:
    `first`, then SIGKILL if it has not ended in ANSWER_SECONDS (a stuck one)."""
    if process is None:
        return
    try:
        signal.pidfd_send_signal(process, first)
        if not select.select([process], [], [], ANSWER_SECONDS)[0]:
            signal.pidfd_send_signal(process, signal.SIGKILL)
            select.select([process], [], [], ANSWER_SECONDS)
    except ProcessLookupError:
        pass  # already gone
    finally:
        os.close(process)


def start_in_background(idle_minutes: float = IDLE_MINUTES) -> subprocess.Popen | None:
    """Starts the warm process and returns at once; None when one is up or starting already.

    It must not hold the stage's terminal or DVC's pipes (DVC waits until they close), nor end with
    the stage's process group (Ctrl-C): its own session, its output to the log."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    lock = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        SOCKETS.mkdir(mode=0o700, exist_ok=True)
        if not private(SOCKETS):
            return None  # `make warm` says why
        SOCKET.unlink(missing_ok=True)
        with LOG_FILE.open("a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "commands.warm", "serve", "--idle-minutes", f"{idle_minutes:g}"]
                + ["--lock", str(lock)],
                cwd=project_root(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[lock],  # the lock passes to it: held until it ends
                start_new_session=True,
            )
    finally:
        os.close(lock)


def starting_or_up() -> bool:
    """Whether a warm process holds the lock (LOCK_FILE)."""
    if not LOCK_FILE.exists():
        return False
    with LOCK_FILE.open() as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def listen_for_stages(idle_minutes: float, lock: int) -> dict | None:
    """Preloads, then forks one stage per connection until idle_minutes pass without one, or its
    project is deleted (a scratch copy). Returns only in a stage's fork, with that stage's request;
    the warm process itself exits here."""
    started, expected, environment = time.monotonic(), process_fingerprint(), dict(os.environ)
    PID_FILE.write_text(str(os.getpid()))  # `make cold` can stop it while it preloads
    signal.signal(signal.SIGTERM, lambda *_: leave("stopped"))
    preload()
    # Set by the libraries while importing (scikit-learn's KMP_* for OpenMP): a stage that imports them has them too.
    set_by_imports = {key: value for key, value in os.environ.items() if environment.get(key) != value}
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{SOCKET}.{os.getpid()}")
    listener.listen()
    os.replace(f"{SOCKET}.{os.getpid()}", SOCKET)  # the socket appears when the warm process is ready
    print(f"warm: ready in {time.monotonic() - started:.1f} s (pid {os.getpid()})", file=sys.stderr, flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the forks
    listener.settimeout(min(idle_minutes * 60, 60))
    last_stage = time.monotonic()
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            if not FOLDER.is_dir():
                leave("its project is gone")
            if time.monotonic() - last_stage >= idle_minutes * 60:
                leave(f"no stage for {idle_minutes:g} minutes")
            continue
        last_stage = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            os.close(lock)  # the lock stays with the warm process alone
            for number in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(number, signal.SIG_DFL)
            try:
                return supervise(connection, expected) | {"set_by_imports": set_by_imports}
            except BaseException:  # a bug: its traceback goes to the log, the warm process goes on
                traceback.print_exc()
                os._exit(1)
        connection.close()


def preload() -> None:
    """Imports every stage module, then forgets the pipeline's own modules: each fork imports them
    again from its stage's directory, while the libraries they imported stay loaded."""
    for module in (*STAGES, *LATER_IMPORTS):
        importlib.import_module(module)
    forget_pipeline_modules()
    # mlflow.keras.log_model checks the model's requirements against what is installed, after mapping
    # every installed package to its modules: mapped once, here (mlflow/utils/requirements_utils.py).
    from mlflow.utils.requirements_utils import _init_packages_to_modules_map

    _init_packages_to_modules_map()
    # Out of the garbage collector's sight: a fork that collects them (or frees them when it exits)
    # writes to every page the warm process shares with it, all that TensorFlow & co. imported.
    # https://docs.python.org/3/library/gc.html#gc.freeze
    gc.collect()
    gc.freeze()


def forget_pipeline_modules() -> None:
    for name in [name for name in sys.modules if name == "pipeline" or name.startswith("pipeline.")]:
        del sys.modules[name]


def leave(reason: str) -> None:
    SOCKET.unlink(missing_ok=True)
    PID_FILE.unlink(missing_ok=True)
    print(f"warm: {reason}; exiting", file=sys.stderr, flush=True)
    os._exit(0)


def supervise(connection: socket.socket, expected: dict) -> dict:
    """In a fork of the warm process: takes the stand-in's streams, forks the stage, tells the stand-in
    its pid and then its exit status, and ends the stage if the stand-in goes away (killed, its
    terminal closed)."""
    if peer_uid(connection) != os.getuid():
        os._exit(1)
    data = b""
    while chunk := connection.recv(1 << 20):
        data += chunk
        if data.endswith(b"\n"):
            break
    else:
        os._exit(0)  # the stand-in went away before it asked
    request = json.loads(data)
    if request["fingerprint"] != expected:
        ours, theirs = expected["variables"], request["fingerprint"]["variables"]
        named = sorted(key for key in {*ours, *theirs} if ours.get(key) != theirs.get(key))
        what = ", ".join(
            ", ".join(named) if key == "variables" else key
            for key in expected
            if request["fingerprint"][key] != expected[key]
        )
        send(
            connection,
            {"cold": f"the warm process was started in another environment ({what} differ)"},
        )
        os._exit(0)
    # The streams only now, asked for by a process that is there to take them: passed to a warm process
    # that never accepts, they would stay open in its socket's queue, and DVC would wait on them for good.
    try:
        send(connection, {"streams": os.getpid()})
        _, descriptors, _, _ = socket.recv_fds(connection, 1, 3)
    except OSError:
        os._exit(0)  # the stand-in went away
    if len(descriptors) != 3:
        os._exit(0)  # the stand-in went away, or could not pass them
    stage = os.fork()
    if stage == 0:
        connection.close()
        for target, descriptor in enumerate(descriptors):
            os.dup2(descriptor, target)
            os.close(descriptor)
        return request
    for descriptor in descriptors:
        os.close(descriptor)
    send(connection, {"pid": stage})
    began = time.monotonic()
    waiting = [os.pidfd_open(stage), connection]
    while True:
        readable, _, _ = select.select(waiting, [], [])
        if waiting[0] in readable:
            break
        if connection in readable and not connection.recv(1):
            os.kill(stage, signal.SIGTERM)  # the stand-in is gone: so is the stage (it closes its MLflow run)
            waiting.remove(connection)
    exit_code = os.waitstatus_to_exitcode(os.waitpid(stage, 0)[1])
    try:
        send(connection, {"exit": exit_code})
    except OSError:
        pass  # the stand-in is gone
    with LOG_FILE.open("a") as log:
        log.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} {request['module']} in {request['directory']}: "
            f"exit {exit_code} after {time.monotonic() - began:.1f} s\n"
        )
    os._exit(0)


def send(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def run_forked_stage(request: dict) -> None:
    """In the stage's fork: become `python -m <module>` as its stand-in was started."""
    os.chdir(request["directory"])
    os.environ.clear()
    os.environ.update(request["set_by_imports"] | request["environment"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    # Fresh streams on the stand-in's descriptors: buffered as Python buffers a terminal or a pipe.
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    # Forks share the warm process's random state; a process of its own seeds from the OS.
    random.seed()
    sys.modules["numpy"].random.seed()
    forget_pipeline_modules()
    importlib.invalidate_caches()
    sys.path[0] = request["directory"]  # as `python -m` puts the working directory first
    sys.argv = [request["module"], *request["arguments"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as ended:
        leave_stage(ended.code)
    leave_stage(None)


def leave_stage(status) -> None:
    """Exits as Python does (non-daemon threads joined, atexit handlers run, streams flushed,
    sys.exit's status), but skips tearing the interpreter down: freeing the modules the fork shares
    with the warm process writes to their pages, in every stage, for memory the kernel reclaims
    anyway. Python's own order: https://docs.python.org/3/c-api/init.html#c.Py_FinalizeEx"""
    threading._shutdown()  # waits for non-daemon threads, as Python does before atexit (private)
    atexit._run_exitfuncs()
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    os._exit(status or 0)


def start(idle_minutes: float) -> None:
    """`make warm`: starts the warm process unless one is up or starting, and waits until it is ready."""
    if not hasattr(os, "pidfd_open"):
        sys.exit("error: warm: needs Linux 5.3 or newer (pidfd_open); the stages run in their own processes")
    if running():
        print(f"warm: already running (pid {PID_FILE.read_text()}); `make cold` stops it", file=sys.stderr)
        return
    SOCKETS.mkdir(mode=0o700, exist_ok=True)
    if not private(SOCKETS):
        sys.exit(f"error: warm: {SOCKETS} is not a folder that only you can open; remove it, then `make warm`")
    process = start_in_background(idle_minutes)  # None: a stage has started one, which is preloading
    print("warm: importing TensorFlow, Keras, MLflow, scikit-learn, pandas, matplotlib, Hydra ...", file=sys.stderr)
    while not SOCKET.exists():
        if (process.poll() is not None) if process else not starting_or_up():
            sys.exit(f"error: warm: the warm process failed to start; see {LOG_FILE}")
        time.sleep(0.1)
    print(
        f"warm: ready (pid {warm_pid()}): stages now start as forks of it; it stops after {idle_minutes:g} "
        "minutes without a stage, or with `make cold`",
        file=sys.stderr,
    )


def private(folder: Path) -> bool:
    """A real folder (no link) of this user's that nobody else can open."""
    status = folder.lstat()
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o077


def peer_uid(connection: socket.socket) -> int:
    return struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def warm_pid() -> int | None:
    """The warm process's pid, if it runs (a pid file can outlive it, and its pid be reused)."""
    try:
        pid = int(PID_FILE.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if command[1:4] == [b"-m", b"commands.warm", b"serve"] else None


def running() -> bool:
    return warm_pid() is not None and SOCKET.exists()


def stop() -> None:
    """`make cold`: ends the warm process (stages it is running finish)."""
    pid = warm_pid()
    if pid is None:
        SOCKET.unlink(missing_ok=True)
        print("warm: not running", file=sys.stderr)
        return
    end_process(open_process(pid))
    SOCKET.unlink(missing_ok=True)  # in case it had to be killed
    again = f"; the next stage starts another unless {SWITCH}=0" if starts_by_default("warm") else ""
    print(f"warm: stopped (pid {pid}); stages it is running finish{again}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="A warm process for quick stage start-ups (`make warm`).")
    parser.add_argument("action", choices=["start", "stop", "serve"])
    parser.add_argument("--idle-minutes", type=float, default=IDLE_MINUTES, help="stop after this long without a stage")
    parser.add_argument("--lock", type=int, help=argparse.SUPPRESS)  # serve: the descriptor of LOCK_FILE it holds
    arguments = parser.parse_args()
    if arguments.action == "serve" and arguments.lock is None:
        parser.error("serve is started by `start` or by a stage, with the lock it holds")
    if arguments.action == "start":
        start(arguments.idle_minutes)
    elif arguments.action == "stop":
        stop()
    else:
        request = listen_for_stages(arguments.idle_minutes, arguments.lock)
        if request:
            run_forked_stage(request)


if __name__ == "__main__":
    main()
