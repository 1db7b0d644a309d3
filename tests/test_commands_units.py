"""The commands' decisions, in milliseconds: when a reproduction matches, when the comparison table
would get poorer, which admin password the tracking server takes, which search space `make tune`
accepts, which model `make serve` serves, which folder and pid `make warm` trusts."""

import json
import os
import shutil

import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.numerics import cpu_fingerprint
from tests.helpers import REPO

# make reproduce: tolerances and the verdict.


@pytest.fixture
def environment_here() -> dict[str, str]:
    """A numeric environment as the train stage records it (this CPU's fingerprint; TensorFlow's part fixed)."""
    return {**cpu_fingerprint(), "threads.intra_op": "0", "onednn": "on", "tensorflow.version": "2.21.0"}


def test_the_same_numeric_environment_must_match_exactly(environment_here, capsys):
    from commands.reproduce import tolerances

    assert tolerances(environment_here, dict(environment_here), None) == ({}, 0.0)
    assert "exactly" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change", [{"threads.intra_op": "1"}, {"onednn": "off"}, {"cpu.isa": "sse4_1 sse4_2 avx avx2 fma"}, {"gpu": "H100"}]
)
def test_another_numeric_environment_gets_the_measured_tolerances(environment_here, change, capsys):
    from commands.reproduce import CROSS_ENVIRONMENT_TOLERANCE, tolerances

    assert tolerances(environment_here, {**environment_here, **change}, None) == (CROSS_ENVIRONMENT_TOLERANCE, 0.0)
    assert capsys.readouterr().err.count("\n  ") == 1  # the one difference, named


@pytest.mark.parametrize("missing", ["reference", "here"])
def test_a_result_without_its_numeric_environment_is_another_environment(environment_here, missing):
    from commands.reproduce import CROSS_ENVIRONMENT_TOLERANCE, tolerances

    reference, here = (None, environment_here) if missing == "reference" else (environment_here, None)
    assert tolerances(reference, here, None) == (CROSS_ENVIRONMENT_TOLERANCE, 0.0)


def test_a_tolerance_given_applies_to_every_metric(environment_here):
    from commands.reproduce import tolerances

    assert tolerances(environment_here, environment_here, 0.01) == ({}, 0.01)
    assert tolerances(None, None, 0.0) == ({}, 0.0)


@pytest.fixture
def committed_metrics() -> dict:
    return json.loads((REPO / "reports/metrics.json").read_text())


def test_identical_metrics_match(committed_metrics, capsys):
    from commands.reproduce import match_metrics

    assert match_metrics(committed_metrics, dict(committed_metrics), {}, 0.0) == []
    assert " no\n" not in capsys.readouterr().out


def test_a_metric_matches_within_its_own_tolerance_only(committed_metrics):
    from commands.reproduce import CROSS_ENVIRONMENT_TOLERANCE, match_metrics

    moved = {**committed_metrics, "test_loss": committed_metrics["test_loss"] + 0.001}
    assert match_metrics(committed_metrics, moved, {}, 0.0) == ["test_loss"]  # same environment: exact
    assert match_metrics(committed_metrics, moved, CROSS_ENVIRONMENT_TOLERANCE, 0.0) == []
    # roc_auc_ovr's tolerance is tighter than test_loss's: the same move is too much for it.
    moved["roc_auc_ovr"] = committed_metrics["roc_auc_ovr"] - 0.001
    assert match_metrics(committed_metrics, moved, CROSS_ENVIRONMENT_TOLERANCE, 0.0) == ["roc_auc_ovr"]
    # A metric without a tolerance of its own takes the default.
    extra = {**committed_metrics, "new_metric": 0.5}
    assert match_metrics(extra, {**extra, "new_metric": 0.505}, {}, 0.01) == []
    assert match_metrics(extra, {**extra, "new_metric": 0.52}, {}, 0.01) == ["new_metric"]


def test_a_metric_on_one_side_only_differs(committed_metrics):
    from commands.reproduce import match_metrics

    fewer = {key: value for key, value in committed_metrics.items() if key != "f1_macro"}
    assert match_metrics(committed_metrics, fewer, {}, 1.0) == ["f1_macro"]
    assert match_metrics(fewer, committed_metrics, {}, 1.0) == ["f1_macro"]
    # A test set lacking a digit has no ROC AUC (evaluate writes null): two such results agree.
    assert match_metrics({"roc_auc_ovr": None}, {"roc_auc_ovr": None}, {}, 0.0) == []
    assert match_metrics({"roc_auc_ovr": None}, {"roc_auc_ovr": 0.99}, {}, 1.0) == ["roc_auc_ovr"]


# make compare: never a poorer table than the committed one, unless forced.


@pytest.fixture
def committed_table(tmp_path, monkeypatch) -> pd.DataFrame:
    """The committed reports/comparison.csv, in a working directory of its own."""
    (tmp_path / "reports").mkdir()
    shutil.copy(REPO / "reports/comparison.csv", tmp_path / "reports")
    monkeypatch.chdir(tmp_path)
    return pd.read_csv(tmp_path / "reports/comparison.csv")


def test_a_table_as_rich_as_the_committed_one_may_replace_it(committed_table):
    from commands.compare import check_not_poorer

    check_not_poorer(committed_table)
    check_not_poorer(committed_table.assign(n=committed_table.n + 1))


def test_a_table_with_fewer_runs_of_a_setting_is_refused(committed_table):
    from commands.compare import check_not_poorer

    fewer = committed_table.copy()
    fewer.loc[fewer.setting == "lr_x10", "n"] = 1
    with pytest.raises(PipelineError) as refused:
        check_not_poorer(fewer)
    assert "lr_x10" in str(refused.value) and "batch_x10" not in str(refused.value)
    # A setting the store holds no run of (a fresh clone's store) counts as none.
    with pytest.raises(PipelineError, match="cnn"):
        check_not_poorer(committed_table[committed_table.setting != "cnn"])


def test_without_a_committed_table_any_table_is_written(committed_table):
    from commands.compare import check_not_poorer

    os.remove("reports/comparison.csv")
    check_not_poorer(committed_table.assign(n=0))


def test_a_run_counts_as_committed_only_when_tagged_clean():
    from mlflow.entities import Run, RunData, RunInfo, RunTag

    from commands.compare import uncommitted

    def run(**tags: str) -> Run:
        info = RunInfo("0" * 32, "1", "", "FINISHED", 0, 0, "active")
        return Run(info, RunData(tags=[RunTag(key, value) for key, value in tags.items()]))

    assert not uncommitted(run(**{"git.dirty": "false"}))
    assert uncommitted(run(**{"git.dirty": "true"}))
    assert uncommitted(run())  # logged before the tag existed: no commit is known to hold it


# make server: the admin password.


@pytest.fixture
def password_variables(monkeypatch):
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD_FILE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "password", ["", "password1234", "Password1234", "changeme", "eleven-char"], ids=repr
)  # unset, MLflow's old default (in any case), a common one, one character short
def test_a_missing_default_or_short_admin_password_is_refused(password_variables, password):
    from commands.tracking_server import admin_password

    password_variables.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    with pytest.raises(PipelineError, match="password"):
        admin_password()


def test_an_admin_password_from_the_environment(password_variables):
    from commands.tracking_server import admin_password

    password_variables.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "twelve-chars")
    assert admin_password() == "twelve-chars"


def test_an_admin_password_from_a_file_outside_the_repository(password_variables, tmp_path):
    from commands.tracking_server import admin_password

    (tmp_path / "admin-password").write_text("a-long-enough-pa55word\n")
    password_variables.setenv("MLFLOW_AUTH_ADMIN_PASSWORD_FILE", str(tmp_path / "admin-password"))
    password_variables.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "ignored-when-a-file-is-given")
    assert admin_password() == "a-long-enough-pa55word"
    (tmp_path / "admin-password").write_text("\n")
    with pytest.raises(PipelineError, match="password"):
        admin_password()


def test_an_admin_password_file_inside_the_repository_is_refused(password_variables, tmp_path):
    """Even through a link from outside: what counts is where the file is, one `git add` away."""
    from commands.tracking_server import admin_password

    (tmp_path / "link").symlink_to(REPO / "README.md")
    for path in (REPO / "README.md", tmp_path / "link"):
        password_variables.setenv("MLFLOW_AUTH_ADMIN_PASSWORD_FILE", str(path))
        with pytest.raises(PipelineError, match="inside the repository"):
            admin_password()


# make tune: the search space is checked before any trial runs.


@pytest.fixture
def search_dir(tmp_path, monkeypatch):
    import commands.tune

    monkeypatch.setattr(commands.tune, "SEARCH_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ("{}", "no parameters"),
        ("{train.learning_rate: {type: float, low: 0.01, high: 0.001}}", "low < high"),
        ("{train.batch_size: {type: categorical}}", "choices"),
        ("{train.batch_size: {type: normal, low: 1, high: 2}}", "type"),
        ("{train.learning_rate: {type: float, low: 0, high: 0.01}}", "train.learning_rate must be > 0"),
        ("{train.momentum: {type: float, low: 0.1, high: 0.9}}", "train.momentum"),
    ],
    ids=["empty", "empty-range", "no-choices", "unknown-type", "out-of-range", "unknown-key"],
)
def test_a_search_space_that_cannot_run_is_refused(search_dir, parameters, fragment):
    from commands.tune import load_space

    (search_dir / "bad.yaml").write_text(f"parameters: {parameters}\n")
    with pytest.raises(PipelineError) as refused:
        load_space("bad")
    assert "conf/search/bad.yaml" in str(refused.value) and fragment in str(refused.value)


def test_a_search_space_that_can_run(search_dir):
    from commands.tune import load_space

    (search_dir / "small.yaml").write_text("parameters: {train.batch_size: {type: categorical, choices: [32, 64]}}\n")
    assert load_space("small").parameters["train.batch_size"].choices == [32, 64]
    with pytest.raises(PipelineError, match="small"):  # a space that does not exist: the ones that do
        load_space("large")


# make serve: which model.


def test_a_model_is_named_by_run_or_by_uri_not_both():
    from commands.model_server import model_uri

    assert model_uri(None, "models:/mnist-classifier@champion") == "models:/mnist-classifier@champion"
    with pytest.raises(PipelineError, match="not both"):
        model_uri("0" * 32, "models:/mnist-classifier@champion")


# make warm: the socket's folder and the pid file are trusted only when they are what they claim.


def test_only_a_private_folder_of_ones_own_holds_the_socket(tmp_path):
    from commands.warm import private

    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    assert private(folder)
    (tmp_path / "link").symlink_to(folder)
    assert not private(tmp_path / "link")  # a link could be redirected
    folder.chmod(0o755)
    assert not private(folder)


@pytest.mark.parametrize("content", [None, "not a pid", str(os.getpid())], ids=["absent", "garbage", "other-process"])
def test_a_pid_file_that_names_no_warm_process_is_not_trusted(tmp_path, monkeypatch, content):
    import commands.warm

    monkeypatch.setattr(commands.warm, "PID_FILE", tmp_path / "pid")
    if content is not None:
        (tmp_path / "pid").write_text(content)
    assert commands.warm.warm_pid() is None  # this process runs pytest, not `commands.warm serve`


# make tune's preset: what compare and Hydra read back.


def test_the_tuned_preset_is_a_setting_compare_names_and_hydra_composes(tmp_path, monkeypatch):
    import optuna

    import commands.compare
    import commands.tune
    from pipeline.config import compose, validate

    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")
    preset = conf / "experiment" / "tuned.yaml"
    monkeypatch.setattr(commands.tune, "TUNED_PRESET", preset)
    monkeypatch.setattr(commands.compare, "TUNED_PRESET", preset)
    distributions = {
        "train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.hidden_units": optuna.distributions.CategoricalDistribution([128, 256]),
    }
    study = optuna.create_study(study_name="mlp", direction="maximize")
    for value, rate, units in ((0.97, 0.001, 128), (0.98, 0.0031, 256)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.learning_rate": rate, "model.hidden_units": units},
                distributions=distributions,
                value=value,
            )
        )
    commands.tune.write_preset(study, finished=7)
    sections = validate(compose(["+experiment=tuned"], conf_dir=conf))
    assert (sections["train"].learning_rate, sections["model"].hidden_units) == (0.0031, 256)  # the best trial's
    assert "7" in commands.compare.setting_label("tuned") and commands.compare.setting_label("cnn") == "cnn"


def test_the_warm_fingerprint_ignores_whether_bytecode_is_written(monkeypatch):
    """make clears PYTHONDONTWRITEBYTECODE, a typed `dvc exp run` keeps the shell's: one warm process serves both."""
    from commands.warm import process_fingerprint

    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    without = process_fingerprint()
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert process_fingerprint() == without
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # a variable that changes what TensorFlow computes
    assert process_fingerprint() != without


def test_the_warm_fingerprint_changes_with_the_packages_not_with_bytecode(tmp_path):
    from commands.warm import installed_distributions

    (tmp_path / "numpy-2.4.0.dist-info").mkdir()
    (tmp_path / "six.py").write_text("")
    before = installed_distributions(str(tmp_path))
    (tmp_path / "__pycache__").mkdir()  # Python's first import of six.py
    (tmp_path / "__pycache__/six.cpython-311.pyc").write_bytes(b"")
    assert installed_distributions(str(tmp_path)) == before
    (tmp_path / "numpy-2.4.0.dist-info").rename(tmp_path / "numpy-2.4.1.dist-info")  # pip upgrading it
    assert installed_distributions(str(tmp_path)) != before


def test_an_interrupted_trial_is_not_counted_as_tried():
    import optuna

    from commands.tune import tried

    study = optuna.create_study(direction="maximize")
    ended = [
        optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.9),
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "diverged"}),
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"interrupted": True}),
    ]
    for trial in ended:
        study.add_trial(trial)
    assert [trial.number for trial in tried(study)] == [0, 1]


def test_a_revision_that_is_not_here_is_one_line_with_the_fix():
    from commands.reproduce import expected_from_revision

    with pytest.raises(PipelineError, match=r"^no commit no-such-tag in this repository: give a tag, branch or"):
        expected_from_revision("no-such-tag")
