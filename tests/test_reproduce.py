"""Reproduce a result from a tag or an MLflow run, exactly, and refuse what cannot be reproduced."""

import json
import sys

import mlflow
import pytest

from tests.conftest import environment, error_lines, git, make_project, run


@pytest.fixture(scope="module")
def tagged_project(tmp_path_factory, mnist_url):
    """A tiny pipeline run, committed and tagged `v1`; then a parameter changed and run again."""
    project = make_project(tmp_path_factory.mktemp("reproduce"))
    env = environment(mnist_url)
    run(project, ["dvc", "repro"], env)
    git(project, "add", "-A")
    git(project, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "tiny result")
    git(project, "tag", "v1")
    tagged_metrics = json.loads((project / "reports/metrics.json").read_text())

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.001", "learning_rate: 0.003"))
    run(project, ["dvc", "repro"], env)
    assert json.loads((project / "reports/metrics.json").read_text()) != tagged_metrics
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return project, env, tagged_metrics


def reproduce(project, env, **variables):
    return run(project, [sys.executable, "-m", "pipeline.reproduce"], {**env, **variables}, check=False)


def test_reproduce_tag_matches_exactly(tagged_project):
    project, env, tagged_metrics = tagged_project
    result = reproduce(project, env, REV="v1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "match exactly" in result.stderr
    for key, value in tagged_metrics.items():
        assert f"{key:<18} {value!r:>22} {value!r:>22}  yes" in result.stdout


def test_reproduce_run_matches_exactly(tagged_project):
    project, env, tagged_metrics = tagged_project
    [tagged_run] = mlflow.search_runs(experiment_names=["mnist"], output_format="list",
                                      filter_string="params.`train.learning_rate` = '0.001'")
    result = reproduce(project, env, RUN=tagged_run.info.run_id)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "match exactly" in result.stderr


def test_run_from_a_dirty_tree_is_refused(tagged_project):
    project, env, _ = tagged_project
    [dirty_run] = mlflow.search_runs(experiment_names=["mnist"], output_format="list",
                                     filter_string="params.`train.learning_rate` = '0.003'")
    assert dirty_run.data.tags["git.dirty"] == "false"  # params.yaml alone does not make a run dirty
    models = project / "pipeline/models.py"
    models.write_text(models.read_text() + "\n# an uncommitted change\n")
    try:
        run(project, ["dvc", "repro", "--force", "train"], env)
    finally:
        git(project, "checkout", "--", "pipeline/models.py")
    newest = mlflow.search_runs(experiment_names=["mnist"], output_format="list",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert newest.data.tags["git.dirty"] == "true"
    result = reproduce(project, env, RUN=newest.info.run_id)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"run {newest.info.run_id} was made from a working tree with uncommitted changes" in line


def test_tampered_metrics_are_reported_as_a_mismatch(tagged_project):
    project, env, tagged_metrics = tagged_project
    git(project, "checkout", "-q", "-b", "tampered", "v1")
    try:
        (project / "reports/metrics.json").write_text(json.dumps({**tagged_metrics, "test_accuracy": 0.99}))
        git(project, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "tamper", "--", "reports/metrics.json")
        result = reproduce(project, env, REV="tampered")
    finally:
        git(project, "checkout", "-q", "-f", "main")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: reproduce: reproduction differs from tampered in test_accuracy (tolerance 0.0)"]
    assert f"{'test_accuracy':<18} {0.99!r:>22} {tagged_metrics['test_accuracy']!r:>22}  NO" in result.stdout
