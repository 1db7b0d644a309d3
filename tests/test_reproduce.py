"""Reproduce a result from a tag or an MLflow run, exactly, and refuse what cannot be reproduced."""

import json
import sys

import mlflow
import pytest

from commands.reproduce import CROSS_ENVIRONMENT_TOLERANCE
from pipeline import numerics
from tests.helpers import TINY, copy_project, environment, error_lines, git, make_project, run

pytestmark = pytest.mark.slow  # every test here runs the pipeline end to end


@pytest.fixture(scope="module")
def tagged_original(tmp_path_factory, mnist_url):
    """A tiny training and evaluation, committed and tagged `v1`; then a parameter changed and run again.
    (error-analysis adds no metric: what reproduce compares is all there.)"""
    project = make_project(tmp_path_factory.mktemp("reproduce"))
    env = environment(mnist_url)
    run(project, ["dvc", "repro", "evaluate"], env)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "tiny result")
    git(project, "tag", "v1")
    tagged_metrics = json.loads((project / "reports/metrics.json").read_text())

    run(project, [sys.executable, "-m", "pipeline.config", *TINY, "train.learning_rate=0.003"], env)
    run(project, ["dvc", "repro", "evaluate"], env)
    assert json.loads((project / "reports/metrics.json").read_text()) != tagged_metrics
    return project, env, tagged_metrics


@pytest.fixture
def tagged_project(tagged_original, tmp_path):
    """This test's own copy of the tagged project: what one test commits or trains, the next never sees."""
    project, env, tagged_metrics = tagged_original
    copy = copy_project(project, tmp_path / "project")
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    return copy, env, tagged_metrics


def reproduce(project, env, rev=None, run_id=None, **variables):
    options = ["--rev", rev] if rev else ["--run", run_id]
    return run(project, [sys.executable, "-m", "commands.reproduce", *options], {**env, **variables}, check=False)


def test_reproduce_tag_matches_exactly(tagged_project):
    project, env, tagged_metrics = tagged_project
    result = reproduce(project, env, rev="v1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same numeric environment as the reference: the metrics must match exactly" in result.stderr
    assert "match exactly" in result.stderr
    for key, value in tagged_metrics.items():
        assert f"{key:<18} {value!r:>22} {value!r:>22} {0:>10g}  yes" in result.stdout
    # Its run outlives the temporary worktree: in this project's store and artifact folder, named.
    [line] = [line for line in result.stderr.splitlines() if line.startswith("reproduce: the reproduction is")]
    run_id = line.split()[6]
    assert line == (
        f"reproduce: the reproduction is MLflow run {run_id} in experiment 'mnist-reproduce' "
        f"of sqlite:///{project / 'mlflow.db'}"
    )
    reproduced = mlflow.get_run(run_id)
    assert reproduced.data.metrics["test_accuracy"] == tagged_metrics["test_accuracy"]
    assert reproduced.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert mlflow.get_experiment(reproduced.info.experiment_id).name == "mnist-reproduce"
    assert "git add" not in result.stdout + result.stderr  # DVC's advice for the temporary worktree


def test_reproduce_run_matches_exactly(tagged_project):
    project, env, tagged_metrics = tagged_project
    [tagged_run] = mlflow.search_runs(
        experiment_names=["mnist"], output_format="list", filter_string="params.`train.learning_rate` = '0.001'"
    )
    result = reproduce(project, env, run_id=tagged_run.info.run_id)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "match exactly" in result.stderr


def test_run_from_a_dirty_tree_is_refused(tagged_project):
    project, env, _ = tagged_project
    [dirty_run] = mlflow.search_runs(
        experiment_names=["mnist"], output_format="list", filter_string="params.`train.learning_rate` = '0.003'"
    )
    assert dirty_run.data.tags["git.dirty"] == "false"  # params.yaml alone does not make a run dirty
    models = project / "pipeline/models.py"
    models.write_text(models.read_text() + "\n# an uncommitted change\n")
    run(project, ["dvc", "repro", "--force", "train"], env)
    newest = mlflow.search_runs(
        experiment_names=["mnist"], output_format="list", order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert newest.data.tags["git.dirty"] == "true"
    result = reproduce(project, env, run_id=newest.info.run_id)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"run {newest.info.run_id} was made from a working tree with uncommitted changes" in line


def test_tampered_metrics_are_reported_as_a_mismatch(tagged_project):
    project, env, tagged_metrics = tagged_project
    git(project, "checkout", "-q", "-b", "tampered", "v1")
    (project / "reports/metrics.json").write_text(json.dumps({**tagged_metrics, "test_accuracy": 0.99}))
    git(project, "commit", "-qm", "tamper", "--", "reports/metrics.json")
    result = reproduce(project, env, rev="tampered")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: reproduce: reproduction differs from tampered in test_accuracy beyond tolerance 0.0"
    ]
    assert f"{'test_accuracy':<18} {0.99!r:>22} {tagged_metrics['test_accuracy']!r:>22} {0:>10g}  no" in result.stdout


def test_another_numeric_environment_is_named_and_judged_within_tolerance(tagged_project):
    """oneDNN off stands for another CPU: the verdict names the difference and uses the measured tolerance."""
    project, env, tagged_metrics = tagged_project
    result = reproduce(project, env, rev="v1", TF_ENABLE_ONEDNN_OPTS="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the numeric environment differs from the reference's; bit-identity is not expected" in result.stderr
    assert "oneDNN (TF_ENABLE_ONEDNN_OPTS): off here, on in the reference" in result.stderr
    assert f"{'test_accuracy':<18} {tagged_metrics['test_accuracy']!r:>22}" in result.stdout
    assert f"{CROSS_ENVIRONMENT_TOLERANCE['test_accuracy']:>10g}" in result.stdout
    assert "metrics match exactly" in result.stderr or "metrics match within tolerance" in result.stderr


def test_unknown_environment_is_judged_within_tolerance_and_tampering_still_fails(tagged_project):
    """A reference from before results carried their numeric environment: said so, then judged within
    the cross-environment tolerance, which admits a small move (accuracy) but not a large one (loss)."""
    project, env, tagged_metrics = tagged_project
    git(project, "checkout", "-q", "-b", "old-style", "v1")
    git(project, "rm", "-q", "reports/numerics.json")
    accuracy = tagged_metrics["test_accuracy"] + CROSS_ENVIRONMENT_TOLERANCE["test_accuracy"] / 2
    (project / "reports/metrics.json").write_text(
        json.dumps({**tagged_metrics, "test_accuracy": accuracy, "test_loss": tagged_metrics["test_loss"] + 0.01})
    )
    git(
        project,
        "commit",
        "-qm",
        "a result without its numeric environment, tampered",
        "--",
        "reports/metrics.json",
        "reports/numerics.json",
    )
    result = reproduce(project, env, rev="old-style")
    assert (
        "the reference records no numeric environment (reports/numerics.json is missing, made by an older "
        "version): treated as a different one"
    ) in result.stderr
    assert (
        f"{'test_accuracy':<18} {accuracy!r:>22} {tagged_metrics['test_accuracy']!r:>22} "
        f"{CROSS_ENVIRONMENT_TOLERANCE['test_accuracy']:>10g}  within"
    ) in result.stdout
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: reproduce: reproduction differs from old-style in test_loss beyond their tolerance"
    ]


def test_run_tags_and_committed_file_hold_the_numeric_environment(tagged_project):
    project, _, _ = tagged_project
    committed = json.loads(git(project, "show", "v1:reports/numerics.json"))
    assert committed["cpu.isa"] and committed["onednn"] == "on" and committed["tensorflow.version"]
    tagged_run = mlflow.search_runs(
        experiment_names=["mnist"],
        output_format="list",
        max_results=1,
        filter_string="params.`train.learning_rate` = '0.001'",
        order_by=["attributes.start_time ASC"],
    )[0]  # v1's, the first
    assert numerics.from_tags(tagged_run.data.tags) == committed
