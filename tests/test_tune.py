"""`make tune`: an Optuna study whose trials are DVC experiments and MLflow runs, continued when run again,
shared by workers through one storage; its best setting re-run with seeds and tabulated by `make compare`."""

import json
import subprocess
import sys

import mlflow
import optuna
import pandas as pd
import pytest

from tests.helpers import NEEDS_POSTGRES, environment, error_lines, git, make_project, run

pytestmark = pytest.mark.slow  # every trial is a tiny `dvc exp run`


def tune(project, env, *arguments, check=True):
    return run(project, [sys.executable, "-m", "commands.tune", *arguments], env, check=check)


def trials_in(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def tagged_runs(project, study: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(
        experiment_names=["mnist"], output_format="list", filter_string=f"tags.`tune.study` = '{study}'"
    )


def test_study_runs_trials_as_experiments_continues_and_its_best_is_compared(tmp_path, mnist_url):
    project = make_project(tmp_path / "project", shrink_conf=True)
    env = environment(mnist_url)
    storage = f"sqlite:///{project / 'optuna.db'}"

    # --force: the project's committed tuned.yaml is the best of a larger study
    first = tune(project, env, "--trials", "1", "--confirm-seeds", "2", "--force")
    [trial] = trials_in(storage, "mlp")
    assert trial.state == optuna.trial.TrialState.COMPLETE
    [trial_run] = tagged_runs(project, "mlp")
    # The objective is the run's validation accuracy; the test set never chooses.
    assert trial_run.data.tags["tune.trial"] == "0" and trial.value == trial_run.data.metrics["val_accuracy"]
    assert trial.user_attrs["mlflow_run_id"] == trial_run.info.run_id
    assert trial_run.data.tags["dvc.exp_name"] == "mlp-trial0"
    assert float(trial_run.data.params["train.learning_rate"]) == pytest.approx(trial.params["train.learning_rate"])
    assert "mlp-trial0" in run(project, ["dvc", "exp", "show", "--json"], env).stdout
    assert "top 1 of 1 completed trials" in first.stdout
    assert "the best of 1 trials of study 'mlp'" in (project / "conf/experiment/tuned.yaml").read_text()

    # The re-run: seeds 0 and 1 of the best setting; seed 0 is the best trial again, bit for bit.
    reruns = {
        run_.data.params["train.seed"]: run_
        for run_ in mlflow.search_runs(experiment_names=["mnist"], output_format="list")
        if "sweep" in run_.data.tags
    }
    assert sorted(reruns) == ["0", "1"]
    assert reruns["0"].data.metrics["test_accuracy"] == trial_run.data.metrics["test_accuracy"]
    assert reruns["0"].data.tags["config.hash"] == trial_run.data.tags["config.hash"]

    compare = run(project, [sys.executable, "-m", "commands.compare", "--force"], env)
    table = pd.read_csv(project / "reports/comparison.csv").set_index("setting")
    markdown = (project / "reports/comparison.md").read_text()
    assert table.loc["tuned", "n"] == 2
    assert "| tuned (best of 1 trials, chosen on validation) | mlp |" in markdown
    # The re-runs are of tuned.yaml before it is committed. Seed 0's config is also the best trial's,
    # whose run is of committed code: the table takes that one (the same weights); seed 1 has only
    # its re-run, marked as a run that no commit rebuilds.
    assert {run_.data.tags["git.dirty"] for run_ in reruns.values()} == {"true"}
    assert trial_run.data.tags["git.dirty"] == "false"
    assert table.loc["tuned", "run_ids"].split() == [trial_run.info.run_id, reruns["1"].info.run_id]
    assert table.loc["tuned", "uncommitted_run_ids"] == reruns["1"].info.run_id
    assert f"`{trial_run.info.run_id[:8]}`, `{reruns['1'].info.run_id[:8]}`† |" in markdown
    assert 'then `make sweep SETTINGS="tuned" FORCE=1`.' in markdown
    assert "Traceback" not in compare.stderr

    again = tune(project, env, "--trials", "2", "--confirm-seeds", "0")  # continues: one more trial
    assert "1 of 2 trials finished" in again.stderr
    trials = trials_in(storage, "mlp")
    assert [trial.number for trial in trials] == [0, 1]
    assert sorted(int(run_.data.tags["tune.trial"]) for run_ in tagged_runs(project, "mlp")) == [0, 1]
    preset = (project / "conf/experiment/tuned.yaml").read_text()
    assert "the best of 2 trials" in preset
    best_value = max(trial.value for trial in trials)  # either trial, should they tie
    assert any(
        f"trial {trial.number})" in preset and f"hidden_units: {trial.params['model.hidden_units']}" in preset
        for trial in trials
        if trial.value == best_value
    )


def test_failed_trial_is_recorded_and_not_retried(tmp_path, mnist_url):
    project = make_project(tmp_path / "project", shrink_conf=True)
    models = project / "pipeline/models.py"  # a bug in the committed code: every trial's training fails
    models.write_text(
        models.read_text().replace('    """The reference model', '    raise RuntimeError("a bug")\n    """')
    )
    git(project, "commit", "-qam", "a bug")
    env = environment(mnist_url)
    result = tune(project, env, "--trials", "1", "--confirm-seeds", "0", "--force", check=False)
    assert result.returncode == 1
    assert "tune: trial 0 failed" in result.stderr
    assert error_lines(result.stderr) == [
        "error: tune: no trial of study 'mlp' completed; see the failed trials' lines above"
    ]
    [trial] = trials_in(f"sqlite:///{project / 'optuna.db'}", "mlp")
    assert trial.state == optuna.trial.TrialState.FAIL
    again = tune(project, env, "--trials", "1", "--confirm-seeds", "0", "--force", check=False)
    assert "1 of 1 trials finished" in again.stderr
    assert len(trials_in(f"sqlite:///{project / 'optuna.db'}", "mlp")) == 1


def test_bad_search_space_is_one_line(tmp_path, mnist_url):
    project = make_project(tmp_path / "project", shrink_conf=True)
    (project / "conf/search/typo.yaml").write_text(
        "parameters:\n  train.learning_rat: {type: float, low: 0.001, high: 0.1}\n"
    )
    result = tune(project, environment(mnist_url), "--space", "typo", check=False)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith(
        "error: tune: conf/search/typo.yaml: cannot compose conf/ with train.learning_rat=0.001: "
        "unknown key 'train.learning_rat'"
    )
    assert not (project / "optuna.db").exists()


@NEEDS_POSTGRES
def test_two_workers_share_one_study_on_postgresql(tmp_path, mnist_url, postgres):
    project = make_project(tmp_path / "project", shrink_conf=True)
    env = environment(mnist_url)
    options = ["--storage", postgres, "--study", "shared", "--trials", "1", "--confirm-seeds", "0", "--force"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "commands.tune", *options],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [stderr[-2000:] for _, stderr in outputs]
    trials = trials_in(postgres, "shared")
    # Both workers start while no trial has finished, so each starts one; the study is then done
    # (--trials 1) but the trial a worker has started always finishes.
    assert len(trials) == 2 and all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    # Each trial trained once, by one of the workers, into its own MLflow run, with its own setting:
    # the two workers share one checkout, whose DVC experiments they take turns to run.
    runs = {run_.info.run_id: run_ for run_ in tagged_runs(project, "shared")}
    assert sorted(int(run_.data.tags["tune.trial"]) for run_ in runs.values()) == [trial.number for trial in trials]
    assert {trial.user_attrs["mlflow_run_id"] for trial in trials} == set(runs)
    for trial in trials:
        trial_run = runs[trial.user_attrs["mlflow_run_id"]]
        assert trial_run.data.tags["tune.trial"] == str(trial.number)
        assert trial_run.data.tags["dvc.exp_name"] == f"shared-trial{trial.number}"
        assert trial_run.data.params["model.hidden_units"] == str(trial.params["model.hidden_units"])
        assert trial.value == trial_run.data.metrics["val_accuracy"]
    assert all("tune: trial" in stderr for _, stderr in outputs)  # both workers ran trials
    assert json.loads(run(project, ["dvc", "exp", "show", "--json"], env).stdout)
