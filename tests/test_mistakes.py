"""Every mistake has a way back: a bad parameter is refused before any output is touched, in one line
that names the real cause and the real fix; `make reset` returns to the committed configuration; no
command overwrites a committed result or creates a store it only reads; pre-flight checks come first."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import copy_project, environment, error_lines, git, make_project, run

MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]
RESET = "`make reset` returns the workspace to the committed configuration"
TRAIN_KEYS = (
    "learning_rate, batch_size, epochs, schedule, seed, steps_per_execution, mixed_precision, distribution, replicas"
)


def clean(project: Path, env: dict) -> None:
    """What a user checks after a mistake: git and DVC both say the workspace is as committed."""
    assert git(project, "status", "--porcelain") == ""
    assert run(project, ["dvc", "status"], env).stdout.strip() == "Data and pipelines are up to date."


@pytest.fixture(scope="module")
def committed_original(tmp_path_factory, mnist_url):
    """A tiny pipeline run (conf/ itself shrunk, as `dvc exp run` composes conf/), committed with its dvc.lock."""
    project = make_project(tmp_path_factory.mktemp("mistakes"), shrink_conf=True)
    env = environment(mnist_url)
    run(project, ["dvc", "repro"], env)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "tiny result")
    return project, env


@pytest.fixture
def committed(committed_original, tmp_path):
    project, env = committed_original
    return copy_project(project, tmp_path / "project"), env


@pytest.fixture
def untrained(tmp_path, mnist_url):
    return make_project(tmp_path / "project", shrink_conf=True), environment(mnist_url)


@pytest.mark.parametrize(
    "override, reason",
    [
        # Hydra's own answer to the first is "To append to your config use +train.epoch=3".
        ("train.epoch=3", f"unknown key 'train.epoch'; allowed in train: {TRAIN_KEYS}"),
        ("+train.epoch=3", f"unknown key 'train.epoch'; allowed in train: {TRAIN_KEYS}"),
        ('train.learning_rate="0.01"', "train.learning_rate must be a number, got '0.01'"),
        ("train.learning_rate=inf", "train.learning_rate must be a finite number, got inf"),
        (
            "+experiment=lr_x1O",
            "In 'config': Could not find 'experiment/lr_x1O' Available options in 'experiment': batch_x10 cnn "
            "default epochs_x10 lr_x10 tuned",
        ),
    ],
)
def test_dvc_exp_run_refuses_a_bad_override_before_anything_runs(untrained, override, reason):
    project, env = untrained
    params = (project / "params.yaml").read_bytes()
    result = run(project, ["dvc", "exp", "run", "-S", override], env, check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == f"ERROR: cannot compose conf/ with {override}: {reason}"
    assert "+train" not in result.stderr.replace(override, "") and "Running stage" not in result.stdout
    assert (project / "params.yaml").read_bytes() == params and git(project, "status", "--porcelain") == ""
    assert run(project, ["dvc", "exp", "list", "--all-commits", "--name-only"], env).stdout.strip() == ""


@pytest.mark.parametrize(
    "edit, difference",
    [
        (("learning_rate: 0.001", 'learning_rate: "0.01"'), "train.learning_rate is '0.01' there, 0.001 in conf/"),
        (("epochs: 1", "epochs: five"), "train.epochs is 'five' there, 1 in conf/"),
        (
            ("epochs: 1", "epoch: 1"),
            "train.epoch is 1 there, absent in conf/; train.epochs is absent there, 1 in conf/",
        ),
    ],
)
def test_a_hand_edit_that_keeps_the_header_stops_dvc_repro(untrained, edit, difference):
    project, env = untrained
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(*edit))
    assert params.read_text().startswith("# Composed from conf/")
    result = run(project, ["dvc", "repro"], env, check=False)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: params: params.yaml is not the composition of conf/ with data.limit=300 train.epochs=1: {difference}. "
        'Put the change in conf/ or an override (`make params OVERRIDES="key=value ..."`), or discard it: '
        f"{RESET}"
    ]
    assert not (project / "data/raw").exists()  # no stage after `params` ran


def test_the_params_stage_of_an_experiment_refuses_bad_params_before_the_stages_after_it(untrained):
    """A second guard behind hydra_plugins/ (a DVC that loads no plugin): `params` runs first, and DVC
    removes a stage's outputs only when it runs that stage."""
    project, env = untrained
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 1", "epochs: 1\n  epoch: 3"))
    result = run(
        project, [sys.executable, "-m", "pipeline.config", "--sync"], {**env, "DVC_EXP_BASELINE_REV": "0" * 40}, False
    )
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: params: params.yaml: unknown key 'train.epoch'; allowed in train: {TRAIN_KEYS}; "
        f"no stage after this one ran, every output is in place; {RESET}"
    ]


def test_make_tune_never_replaces_the_tuned_setting_of_a_larger_study(untrained):
    project, env = untrained
    preset = (project / "conf/experiment/tuned.yaml").read_text()
    assert "the best of 20 trials of study 'mlp'" in preset  # the committed one
    result = run(project, [*MAKE, "tune", "TRIALS=1"], env, check=False)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        "error: tune: conf/experiment/tuned.yaml holds the best of 20 trials of study 'mlp'; this study's 1 would "
        "replace it, so nothing ran. Continue that study (`make tune TRIALS=20` or more, with its STUDY_STORAGE), "
        "or replace it anyway with `make tune FORCE=1`"
    ]
    assert "tune: trial" not in result.stderr
    assert (project / "conf/experiment/tuned.yaml").read_text() == preset
    assert git(project, "status", "--porcelain") == ""


@pytest.mark.parametrize("target", [["sweep", "SETTINGS=default"], ["tune", "FORCE=1"]])
def test_commands_that_run_dvc_experiments_check_the_git_identity_first(untrained, tmp_path, target):
    project, env = untrained
    home = tmp_path / "home"
    home.mkdir()
    env = {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1"}
    result = run(project, [*MAKE, *target], env, check=False)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: {target[0]}: git has no user.name and no user.email here, and `dvc exp run` records each "
        'experiment as a git commit; set them: git config --global user.name "Your Name"; '
        "git config --global user.email you@example.com"
    ]
    assert not (project / "mlflow.db").exists() and git(project, "status", "--porcelain") == ""


@pytest.mark.parametrize(
    "command",
    [["compare"], ["serve"], ["promote", "RUN=0123abcd"], ["reproduce", "RUN=0123abcd"]],
    ids=lambda command: command[0],
)
def test_read_only_commands_report_a_missing_store_and_create_none(untrained, command):
    project, env = untrained
    result = run(project, [*MAKE, *command], env, check=False)
    assert result.returncode != 0
    store = project / "mlflow.db"
    assert error_lines(result.stderr) == [
        f"error: {command[0]}: no tracking store at {store} "
        f"(sqlite:///{store}), so no run to read; log runs first (`dvc repro`, `make sweep`), or point "
        "MLFLOW_TRACKING_URI at the store that holds them"
    ]
    assert not store.exists() and not (project / "mlflow.db.lock").exists()


def test_make_reset_on_a_clone_without_outputs_restores_params_and_names_what_dvc_pull_fetches(untrained):
    project, env = untrained
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("seed: 0", "seed: 7"))
    result = run(project, [*MAKE, "reset"], env)
    assert result.stdout.strip().splitlines()[-1] == (
        "reset: dvc.lock, params.yaml, reports/metrics.json, reports/numerics.json as committed, and the outputs "
        "dvc.lock names from DVC's cache; not in DVC's cache: data/predictions, data/prepared, data/raw, "
        "models/model.keras, models/run.json, reports/classification_report.json, reports/error_analysis, "
        "reports/training_curves.png, reports/training_history.csv (`dvc pull` fetches them, `dvc repro` "
        "recomputes them)"
    )
    assert git(project, "status", "--porcelain") == ""


@pytest.mark.slow
def test_every_mistake_has_a_way_back(committed):
    project, env = committed
    clean(project, env)
    committed_metrics = (project / "reports/metrics.json").read_text()

    # Hydra's advice followed: refused before DVC stashes or runs anything; every output in place.
    result = run(project, ["dvc", "exp", "run", "-S", "+train.epoch=3"], env, check=False)
    assert result.returncode != 0 and result.stderr.startswith("ERROR: cannot compose conf/ with +train.epoch=3")
    assert (project / "models/model.keras").exists() and (project / "reports/numerics.json").exists()
    clean(project, env)

    # A hand edit that keeps the header: stopped, then discarded with the command its line names.
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.001", 'learning_rate: "0.01"'))
    result = run(project, ["dvc", "repro"], env, check=False)
    assert result.returncode != 0 and error_lines(result.stderr)[0].endswith(RESET)
    reset = run(project, [*MAKE, "reset"], env)
    assert "reset: dvc.lock, params.yaml, reports/metrics.json, reports/numerics.json as committed" in reset.stdout
    clean(project, env)

    # An experiment leaves its parameters and results in the workspace (`dvc repro` is then up to date):
    # reset brings the committed ones back, and the experiment stays in DVC's refs.
    run(project, ["dvc", "exp", "run", "-n", "other-seed", "-S", "train.seed=1"], env)
    assert "seed: 1" in params.read_text()
    assert git(project, "status", "--porcelain") != ""
    run(project, [*MAKE, "reset"], env)
    clean(project, env)
    assert (project / "reports/metrics.json").read_text() == committed_metrics
    assert "other-seed" in run(project, ["dvc", "exp", "list", "--name-only"], env).stdout

    # The broken workspace of a failed run (outputs removed) comes back from DVC's cache.
    (project / "models/model.keras").unlink()
    (project / "reports/numerics.json").unlink()
    run(project, [*MAKE, "reset"], env)
    clean(project, env)
    assert json.loads((project / "reports/metrics.json").read_text()) == json.loads(committed_metrics)
