"""The project's layout and conventions: one list of what shapes the weights, imports without side
effects, commands that take their options as arguments."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.data_io import TRAINING_INPUTS
from tests.helpers import CI_MARKERS, REPO

MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed", "-n"]
COMMANDS = ["sweep", "tune", "compare", "reproduce", "warm", "model_server", "tracking_server"]


def test_the_train_stage_depends_on_what_shapes_the_weights():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["deps"] == [*TRAINING_INPUTS, "data/prepared"]


def changed_variables(setup: str, modules: list[str]) -> list[str]:
    """The variables that importing `modules` changes, after `setup` ran, in a user's shell (outside CI:
    MLflow starts its telemetry client on import, and sets a variable, only there)."""
    env = {key: value for key, value in os.environ.items() if key not in CI_MARKERS}
    check = (
        f"{setup}; import json, os; before = dict(os.environ); import {', '.join(modules)}; "
        "print(json.dumps(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))))"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_importing_the_shared_modules_changes_nothing_in_the_process():
    assert changed_variables("pass", ["pipeline.config", "pipeline.tracking", "pipeline.data_io"]) == []


def test_the_package_adds_nothing_to_what_its_libraries_do_on_import():
    """TensorFlow, Keras and MLflow set variables of their own on import; our modules add none."""
    modules = [f"pipeline.{path.stem}" for path in (REPO / "pipeline").glob("*.py") if path.stem != "__init__"]
    modules += [f"commands.{name}" for name in COMMANDS]
    libraries = "import tensorflow, keras, mlflow, mlflow.keras, sklearn, matplotlib.pyplot, optuna, hydra"
    assert changed_variables(libraries, modules) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", f"commands.{command}", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["compare"], "python -m commands.compare "),
        (["compare", "FORCE=0"], "python -m commands.compare "),
        (["compare", "FORCE=1"], "python -m commands.compare --force"),
        (["sweep", "SEEDS=3", "FORCE=no"], "python -m commands.sweep  --seeds '3'"),
        (["reproduce", "REV=HEAD"], "python -m commands.reproduce --rev 'HEAD'"),
        (["tune", "CONFIRM_SEEDS=0"], "python -m commands.tune --confirm-seeds '0'"),
    ],
)
def test_make_passes_its_variables_as_options(arguments, expected):
    result = subprocess.run([*MAKE, *arguments], cwd=REPO, capture_output=True, text=True, check=True)
    assert " ".join(result.stdout.replace("\\\n", " ").split()) == " ".join(expected.split())


def test_an_exported_variable_is_not_an_option():
    """`export MODEL=...` for something else must not change what `make serve` serves."""
    env = {**os.environ, "MODEL": "models:/elsewhere/1", "FORCE": "1"}
    for target in ("serve", "compare"):
        result = subprocess.run([*MAKE, target], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        assert "--model" not in result.stdout and "--force" not in result.stdout, result.stdout
