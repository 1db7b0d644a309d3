"""The one error path of every entry point (stages, params, sweep, compare, reproduce).

What the user can fix (PipelineError: bad params, a missing upstream output, an unreachable store;
OSError: the filesystem refused) is one `error: <command>: <what and the fix>` line and exit 1.
Ctrl-C, SIGTERM or SIGHUP is one line and exit 130. Anything else is a bug and keeps its traceback.
PIPELINE_DEBUG=1 adds the traceback to the one-line errors too.
"""

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


class PipelineError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake in the options (`make serve PORT=abc`) as one line, `error: <command>:
    <mistake>`, and argparse's exit status 2, rather than its usage text."""

    def __init__(self, *arguments: Any, command: str | None = None, **options: Any) -> None:
        super().__init__(*arguments, **options)
        self.command = command or self.prog.split()[-1].removesuffix(".py")  # a subcommand's: its own name

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.command}: {message}; `make help` lists the targets and their settings", file=sys.stderr)
        sys.exit(2)


# Set by the signal handler below. Python drops an exception raised inside a __del__ method ("Exception
# ignored in"), and TensorFlow's __del__ methods run at any moment of a training: a Ctrl-C that landed in
# one would be lost. https://docs.python.org/3/reference/datamodel.html#object.__del__
_interrupted = threading.Event()


def _interrupt(signal_number: int, frame: Any) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raises the KeyboardInterrupt of a Ctrl-C or SIGTERM that Python dropped; checked between a
    training's steps, before outputs land and before a run is marked FINISHED."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def guard(command: str, function: Callable[..., Any], *arguments: Any, interrupted: str = "run it again") -> None:
    """Runs function(*arguments) as the command named `command`, reporting what the user can fix."""
    # Ctrl-C, SIGTERM (a `kill`, a CI timeout, a dvc that died: runtime.stop_with) and SIGHUP (a closed
    # terminal) unwind as a KeyboardInterrupt: open MLflow runs get closed. A signal ignored on purpose
    # (`nohup`, a background job's Ctrl-C) stays ignored.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _interrupt)
    try:
        function(*arguments)
        raise_if_interrupted()
    except KeyboardInterrupt:
        fail(command, f"interrupted; {interrupted}", exit_code=130)
    except Exception as error:
        # After a signal, any error is the interrupt's: C code that ran the handler and went on turns its
        # KeyboardInterrupt into another error (TensorFlow's tracing: "SystemError: ... bad argument to
        # internal function").
        if _interrupted.is_set():
            fail(command, f"interrupted; {interrupted}", exit_code=130)
        if isinstance(error, PipelineError):
            fail(command, str(error))
        if isinstance(error, OSError):
            fail(command, describe_os_error(error))
        raise


def describe_os_error(error: OSError) -> str:
    """The filesystem's refusal, named by the path and what is wrong with it."""
    path = error.filename or "a file"
    reason = error.strerror or str(error)
    if isinstance(error, FileNotFoundError):
        return f"{path} not found ({reason}); check the path, or run `dvc repro` to produce it"
    if isinstance(error, PermissionError):
        return f"no permission to use {path} ({reason}); check its owner and mode"
    if isinstance(error, NotADirectoryError):
        path = file_above(path)
    if isinstance(error, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return f"{path} is in the way ({reason}); a file stands where a folder is needed, or the reverse"
    return f"cannot use {path} ({reason})"


def file_above(path: str) -> str:
    """The file that stands where a folder of `path` is needed (the one to move), as the user would
    type it: relative to the working directory when inside it. `path` itself when there is none."""
    for folder in reversed(Path(path).parents):  # from the top down
        if folder.exists() and not folder.is_dir():
            inside = not folder.is_absolute() or folder.is_relative_to(Path.cwd())
            return os.path.relpath(folder) if inside else str(folder)
    return path


def fail(command: str, message: str, exit_code: int = 1) -> None:
    if os.environ.get("PIPELINE_DEBUG"):
        traceback.print_exc()
    print(f"error: {command}: {message}", file=sys.stderr)
    sys.exit(exit_code)
