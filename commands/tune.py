"""`make tune`: an Optuna study over conf/search/<space>.yaml, each trial a DVC experiment and an MLflow run.

Each trial is `dvc exp run --temp` with the trial's overrides (so `dvc exp show` lists it and it
reproduces like any experiment); its train stage tags the MLflow run with the study and the trial
number. The objective is the last epoch's validation accuracy: the test set never chooses.

The study lives in Optuna's storage (STUDY_STORAGE; default: SQLite beside the MLflow store), so
`make tune` again continues it, and workers on other machines pointed at one PostgreSQL storage
join it. TRIALS counts the study's finished trials (complete or failed) across all of them.
One checkout runs one trial at a time: DVC's `--temp` experiments share one stash per repository,
and two run at once can swap or repeat each other's entries; parallel trials take separate clones.
At the end the best setting is written to conf/experiment/tuned.yaml, a preset like the others,
and re-run with SEEDS seeds through `make sweep`, which `make compare` shows as its own row. A study
of fewer trials than the one that wrote it does not replace it unless forced (as `make compare`
keeps a table of more runs): checked before the first trial and again before the write.
"""

import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import project_root, tracking
from pipeline.config import CONF_DIR, TUNED_PRESET, training_hash
from pipeline.errors import ArgumentParser, PipelineError, guard

SEARCH_DIR = CONF_DIR / "search"
# A worker that dies without a word (SIGKILL, power cut) leaves its trial RUNNING; a trial whose
# heartbeat is older than the grace period is marked failed by the next worker.
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
TOP = 5
PRESET_STUDY = re.compile(r"^# Written by `make tune`: the best of (\d+) trials of study '([^']*)'", re.MULTILINE)


@dataclass
class SearchParameter:
    type: str = MISSING  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class SearchSpace:
    parameters: dict[str, SearchParameter] = field(default_factory=dict)


def load_space(name: str) -> SearchSpace:
    path, shown = SEARCH_DIR / f"{name}.yaml", f"conf/search/{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(file.stem for file in SEARCH_DIR.glob("*.yaml")))
        raise PipelineError(f"no search space {shown}; SPACE= one of: {known}")
    try:
        space = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchSpace), OmegaConf.load(path)))
    except OmegaConfBaseException as error:
        raise PipelineError(f"{shown}: {' '.join(str(error).split())}") from None
    if not space.parameters:
        raise PipelineError(f"{shown}: no parameters to search")
    for key, parameter in space.parameters.items():
        ranged = parameter.low is not None and parameter.high is not None and parameter.low < parameter.high
        if not (parameter.type in ("float", "int") and ranged or parameter.type == "categorical" and parameter.choices):
            raise PipelineError(
                f"{shown}: {key} needs type float or int with low < high, or type categorical with choices"
            )
        for value in parameter.choices or (parameter.low, parameter.high):  # before any trial runs
            try:
                training_hash([f"{key}={int(value) if parameter.type == 'int' else value}"])
            except PipelineError as error:
                raise PipelineError(f"{shown}: {error}") from None
    return space


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    suggested = {}
    for key, parameter in space.parameters.items():
        if parameter.type == "categorical":
            suggested[key] = trial.suggest_categorical(key, parameter.choices)
        elif parameter.type == "int":
            suggested[key] = trial.suggest_int(key, int(parameter.low), int(parameter.high), log=parameter.log)
        else:
            suggested[key] = trial.suggest_float(key, parameter.low, parameter.high, log=parameter.log)
    return suggested


class TrialFailed(Exception):
    """A trial whose experiment failed: Optuna records it as failed and the study goes on."""


def tried(study) -> list:
    """The trials that ran to their end: completed, or failed on their own (a diverged training, say).
    An interrupted one is not among them: the next `make tune` runs another in its place."""
    import optuna

    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [
        trial for trial in study.get_trials(deepcopy=False, states=ended) if not trial.user_attrs.get("interrupted")
    ]


def stop_after(trials: int):
    """Optuna's MaxTrialsCallback, counting only the trials tried (interrupted ones run again)."""

    def stop_when_tried(study, trial) -> None:
        if len(tried(study)) >= trials:
            study.stop()

    return stop_when_tried


def run_trial(trial, space: SearchSpace, study_name: str) -> float:
    overrides = [
        f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
        for key, value in suggest(trial, space).items()
    ]
    name = f"{study_name}-trial{trial.number}"
    trial.set_user_attr("dvc_experiment", name)
    print(f"tune: trial {trial.number}: {' '.join(overrides)}", file=sys.stderr)
    # `dvc exp run --temp` queues its entry in the repository's one stash and then runs whichever
    # entry is first there; two at once in one checkout can run each other's (or one twice):
    # https://github.com/iterative/dvc/blob/3.67.1/dvc/repo/experiments/queue/workspace.py#L85
    lock = FileLock(project_root() / ".dvc" / "tmp" / "tune-trial.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"tune: trial {trial.number} waits: another worker's trial runs in this checkout", file=sys.stderr)
        lock.acquire()
    try:
        run = experiment_run(name, overrides, study_name, trial)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # Optuna records it as failed; it does not count as tried
        raise
    finally:
        lock.release()
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.data.metrics["val_accuracy"]  # the last epoch's


def experiment_run(name: str, overrides: list[str], study_name: str, trial):
    """Runs the trial's DVC experiment and returns the MLflow run that holds its result."""
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True)  # a failed earlier attempt's name
    command = ["dvc", "exp", "run", "--temp", "--name", name]
    command += [argument for override in overrides for argument in ("--set-param", override)]
    env = {**os.environ, "PIPELINE_STUDY": study_name, "PIPELINE_TRIAL": str(trial.number)}
    experiment = subprocess.run(command, env=env, capture_output=True, text=True)
    if experiment.returncode != 0:
        output = (experiment.stdout + experiment.stderr).splitlines()
        # The stage's own `error:` line says why; a bug's traceback ends with the exception.
        reason = next((line for line in output if line.startswith("error:")), None) or next(
            (line for line in reversed(output) if line.strip() and not line.startswith("ERROR: failed to reproduce")),
            "",
        )
        trial.set_user_attr("fail_reason", reason.strip())
        raise TrialFailed(f"experiment {name} failed: {reason.strip()}")
    run = trial_run(study_name, trial.number) or earlier_run(overrides)
    if run is None:
        raise TrialFailed(f"experiment {name} finished but no MLflow run holds its result")
    return run


def trial_run(study_name: str, number: int):
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        output_format="list",
        max_results=1,
        filter_string=f"tags.`tune.study` = '{study_name}' and tags.`tune.trial` = '{number}' "
        "and attributes.status = 'FINISHED'",
    )
    return runs[0] if runs else None


def earlier_run(overrides: list[str]):
    """The run of an identical setting: DVC restores a stage it ran before from its run cache,
    without executing it, so a repeated suggestion logs nothing new; the earlier run stands for it."""
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        output_format="list",
        max_results=1,
        filter_string=f"tags.`config.hash` = '{training_hash(overrides)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def default_storage() -> str:
    return f"sqlite:///{project_root() / 'optuna.db'}"


def check_not_smaller(trials: int, study_name: str) -> None:
    """Refuses to replace conf/experiment/tuned.yaml with the best of a smaller study (--force does)."""
    found = PRESET_STUDY.search(TUNED_PRESET.read_text()) if TUNED_PRESET.exists() else None
    if found and trials < int(found[1]):
        raise PipelineError(
            f"conf/experiment/tuned.yaml holds the best of {found[1]} trials of study {found[2]!r}; this study's "
            f"{trials} would replace it, so nothing ran. Continue that study (`make tune TRIALS={found[1]}` or "
            "more, with its STUDY_STORAGE), or replace it anyway with `make tune FORCE=1`"
        )


@tracking.store_faults()
def tune(space_name: str, trials: int, storage_url: str, study_name: str, seeds: int, force: bool = False) -> None:
    import optuna

    space = load_space(space_name)
    tracking.check_git_identity()
    tracking.connect()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed here instead
    storage = open_storage(storage_url)
    # No sampler seed: workers on other machines seeded alike would suggest the same settings.
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(),
        load_if_exists=True,
    )
    done = len(tried(study))
    if not force:
        check_not_smaller(max(trials, done), study_name)
    print(f"tune: study {study_name!r} in {storage_url}: {done} of {trials} trials finished", file=sys.stderr)
    started = time.monotonic()
    if done < trials:
        study.optimize(
            lambda trial: run_trial(trial, space, study_name),
            catch=(TrialFailed,),
            callbacks=[stop_after(trials), report],
        )
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise PipelineError(f"no trial of study {study_name!r} completed; see the failed trials' lines above")
    print_top(complete, time.monotonic() - started)
    if not force:
        check_not_smaller(len(tried(study)), study_name)
    write_preset(study, len(tried(study)))
    if seeds:
        from commands.sweep import sweep

        try:  # one at a time, so that their fit times compare with the comparison table's other rows
            sweep(["tuned"], seeds, 1, [], force=False)
        except subprocess.CalledProcessError as error:
            raise PipelineError(
                f"`{' '.join(error.cmd)}` failed (exit {error.returncode}); see its output above"
            ) from None


def open_storage(url: str):
    """Optuna's storage; workers starting together on a new database race to create its tables."""
    import optuna
    import sqlalchemy.exc

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        except sqlalchemy.exc.IntegrityError:  # another worker created them first: open them again
            if attempt == 3:
                raise
            time.sleep(1 + attempt)


def report(study, trial) -> None:
    """One line per finished trial, with the best so far."""
    import optuna

    outcome = (
        f"failed: {trial.user_attrs.get('fail_reason') or 'see above'}"
        if trial.value is None
        else f"validation accuracy {trial.value:.4f}"
    )
    best = ""
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        best = f"; best so far {study.best_value:.4f} (trial {study.best_trial.number})"
    print(f"tune: trial {trial.number} {outcome}{best}", file=sys.stderr)


def print_top(complete: list, seconds: float) -> None:
    ranked = sorted(complete, key=lambda trial: trial.value, reverse=True)[:TOP]
    keys = list(ranked[0].params)
    print(f"\ntune: top {len(ranked)} of {len(complete)} completed trials (this session {seconds / 60:.1f} min):")
    print("  trial  val_accuracy  " + "  ".join(f"{key:>20}" for key in keys) + "  mlflow run")
    for trial in ranked:
        print(
            f"  {trial.number:>5}  {trial.value:>12.4f}  "
            + "  ".join(f"{trial.params[key]!s:>20}" for key in keys)
            + f"  {trial.user_attrs.get('mlflow_run_id', '')}"
        )


def write_preset(study, finished: int) -> None:
    best = study.best_trial
    lines = [
        "# @package _global_",
        f"# Written by `make tune`: the best of {finished} trials of study {study.study_name!r}, chosen on",
        f"# validation accuracy ({best.value:.4f}, trial {best.number}); the test set played no part.",
        "# `make sweep SETTINGS=tuned SEEDS=3` re-runs it, `make compare` shows it beside the article's four.",
    ]
    sections: dict[str, dict[str, Any]] = {}
    for key, value in best.params.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    text = "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(sections))
    TUNED_PRESET.write_text(text)
    print(
        f"tune: best setting (trial {best.number}, validation accuracy {best.value:.4f}): "
        f"{' '.join(f'{key}={value}' for key, value in best.params.items())}; written to conf/experiment/tuned.yaml",
        file=sys.stderr,
    )


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mlp", help="conf/search/<space>.yaml")
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should hold")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///<project>/optuna.db)")
    parser.add_argument("--study", help="study name (default: the space's name)")
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        default=3,
        help="re-runs of the best setting for `make compare`, seeds 0..N-1 (0: none)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace conf/experiment/tuned.yaml even with the best of a smaller study"
    )
    arguments = parser.parse_args()
    if arguments.trials < 1 or arguments.confirm_seeds < 0:
        parser.error("--trials must be >= 1, --confirm-seeds >= 0")
    guard(
        "tune",
        tune,
        arguments.space,
        arguments.trials,
        arguments.storage or default_storage(),
        arguments.study or arguments.space,
        arguments.confirm_seeds,
        arguments.force,
        interrupted="the unfinished trial is recorded as failed; `make tune` again continues the study",
    )


if __name__ == "__main__":
    main()
