"""`make reproduce REV=<tag or commit>` or `RUN=<mlflow run id>`: recompute a result and compare.

Checks REV out into a temporary git worktree that shares this repository's DVC cache and remote,
restores the data stages from them when they are there (recomputing them otherwise), retrains,
re-evaluates and re-analyses for real (forced: no run-cache shortcut), then compares the fresh
reports/metrics.json with the expected one: the file committed at REV, or the run's metrics.

The verdict depends on the numeric environment (pipeline/numerics.py) of both results. The same
environment must give bit-identical metrics: tolerance 0, any difference fails. Another CPU
instruction set, thread count, oneDNN setting or GPU gives slightly different weights: then the
differences are named and each metric must lie within CROSS_ENVIRONMENT_TOLERANCE.
TOLERANCE=<absolute> overrides both.

The reproduction's MLflow run goes to this project's store (the worktree, and a store resolved inside
it, are deleted at the end), in an experiment of its own (<experiment>-reproduce), so that `make compare`
does not take it for a sweep's run; the last line names it.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from pipeline import numerics, runtime, tracking
from pipeline.config import HEADER, PARAMS_FILE, recorded_composition
from pipeline.data_io import METRICS_FILE, RUN_FILE
from pipeline.errors import ArgumentParser, PipelineError, guard
from pipeline.tracking import git

# How far each metric may move when only the numeric environment changes. Measured by
# `make numerics` (bench/numeric_environments.md: oneDNN on/off, its ISA capped, 1 or 2 threads) and set with a
# margin above the largest move seen there; the seed-to-seed spread of the comparison table
# (reports/comparison.md) is larger still, so a real regression does not hide inside it.
CROSS_ENVIRONMENT_TOLERANCE = {
    "test_accuracy": 0.002,
    "test_loss": 0.005,  # moves more than the rates do there: an average of -log(p) feels the last bits
    "precision_macro": 0.002,
    "recall_macro": 0.002,
    "f1_macro": 0.002,
    "roc_auc_ovr": 0.0002,
}


def expected_from_revision(revision: str) -> tuple[str, dict, None, dict | None]:
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=True)
    except PipelineError:
        raise PipelineError(
            f"no commit {revision} in this repository: give a tag, branch or commit (`git tag` and `git log "
            "--oneline` list them; a tag made in another clone comes with `git fetch --tags`)"
        ) from None
    try:
        metrics = json.loads(git("show", f"{commit}:{METRICS_FILE}", check=True))
    except PipelineError:
        raise PipelineError(f"{revision} has no committed {METRICS_FILE}: nothing to compare with") from None
    try:
        environment = json.loads(git("show", f"{commit}:{numerics.NUMERICS_FILE}", check=True))
    except PipelineError:
        environment = None  # committed before results carried their numeric environment
    return commit, metrics, None, environment


@tracking.store_faults()
def expected_from_run(run_id: str) -> tuple[str, dict, dict, dict | None]:
    tracking.connect(existing=True)
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise PipelineError(f"no run {run_id} in {tracking.tracking_uri()}") from None
    tags = run.data.tags
    if tags.get("git.dirty") != "false" or tags.get("git.commit", "unknown") == "unknown":
        raise PipelineError(
            f"run {run_id} was made from a working tree with uncommitted changes "
            f"(git.dirty={tags.get('git.dirty')}): no commit holds its code. "
            "Commit the change and run again to get a reproducible run"
        )
    return tags["git.commit"], run.data.metrics, run.data.params, numerics.from_tags(tags) or None


def apply_params(worktree: Path, params: dict[str, str]) -> None:
    """Writes a run's params (strings in MLflow) over the params.yaml of its commit, each value that
    differs also as an override in the header, so that params.yaml stays the composition of conf/ with
    its recorded overrides (the `params` stage refuses anything else)."""
    params_file = worktree / PARAMS_FILE
    config = OmegaConf.load(params_file)
    recorded = recorded_composition(params_file)
    overrides = list(recorded[1]) if recorded else []
    for key, text in params.items():
        # OmegaConf's YAML reads 1e-05 as the float it was (PyYAML's, as a string)
        value = None if text == "None" else OmegaConf.to_container(OmegaConf.create(f"value: {text}"))["value"]
        if OmegaConf.select(config, key, default=object()) == value:
            continue
        OmegaConf.update(config, key, value, force_add=False)
        overrides = [override for override in overrides if override.split("=", 1)[0].lstrip("+~") != key]
        overrides.append(f"{key}={json.dumps(value)}")  # JSON's numbers, strings, lists, null: Hydra's too
    header = HEADER.format(digest=recorded[0], overrides=json.dumps(overrides)) if recorded else ""
    params_file.write_text(f"{header}\n{OmegaConf.to_yaml(config)}".lstrip())


@tracking.store_faults()
def reproduction_store() -> dict[str, str]:
    """The tracking settings of the worktree's stages: this project's store, the reproductions' experiment
    created here first (with this project's artifact folder: the worktree's would go with it)."""
    uri = tracking.connect()
    experiment = f"{os.environ.get('MLFLOW_EXPERIMENT_NAME', tracking.DEFAULT_EXPERIMENT)}-reproduce"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    tracking.experiment_id()
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}


def dvc(worktree: Path, store: dict[str, str], *arguments: str) -> None:
    # The worktree is its own DVC project: DVC_ROOT must not point back at this repository.
    env = {key: value for key, value in runtime.caller_environment.items() if key != "DVC_ROOT"} | store
    # A warm process started in the scratch checkout would only compete for the CPU, then linger.
    env.setdefault("PIPELINE_WARM", "0")
    result = subprocess.run(["dvc", *arguments], cwd=worktree, env=env)
    if result.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(arguments)}` failed in the worktree (exit {result.returncode})")


def tolerances(reference: dict | None, here: dict | None, override: float | None) -> tuple[dict[str, float], float]:
    """Per-metric tolerance: 0 in the reference's numeric environment, measured ones elsewhere."""
    if override is not None:
        print(f"reproduce: TOLERANCE={override} for every metric, as asked", file=sys.stderr)
        return {}, override
    if reference is None or here is None:
        missing = "the reference" if reference is None else "this reproduction"
        print(
            f"reproduce: {missing} records no numeric environment ({numerics.NUMERICS_FILE} is missing, "
            "made by an older version): treated as a different one; bit-identity is not expected",
            file=sys.stderr,
        )
        return CROSS_ENVIRONMENT_TOLERANCE, 0.0
    differing = numerics.differences(reference, here)
    if not differing:
        print("reproduce: same numeric environment as the reference: the metrics must match exactly", file=sys.stderr)
        return {}, 0.0
    print(
        "reproduce: the numeric environment differs from the reference's; bit-identity is not expected:",
        file=sys.stderr,
    )
    for line in differing:
        print(f"  {line}", file=sys.stderr)
    return CROSS_ENVIRONMENT_TOLERANCE, 0.0


def match_metrics(expected: dict, actual: dict, tolerance: dict[str, float], default: float) -> list[str]:
    """Prints expected and reproduced side by side; returns the keys outside their tolerance."""
    print(f"\n{'metric':<18} {'expected':>22} {'reproduced':>22} {'tolerance':>10}  match")
    differing = []
    for key in sorted(set(expected) | set(actual)):
        want, got = expected.get(key), actual.get(key)
        allowed = tolerance.get(key, default)
        same = want == got or (
            isinstance(want, float) and isinstance(got, float) and math.isclose(want, got, rel_tol=0, abs_tol=allowed)
        )
        verdict = "no" if not same else "yes" if want == got else "within"
        print(f"{key:<18} {want!r:>22} {got!r:>22} {allowed:>10g}  {verdict}")
        if not same:
            differing.append(key)
    return differing


def reproduce(revision: str | None, run_id: str | None, tolerance: float | None) -> None:
    if bool(revision) == bool(run_id):
        raise PipelineError("give exactly one of REV=<commit, tag or branch> (e.g. REV=HEAD) or RUN=<mlflow run id>")
    commit, expected, params, reference_environment = (
        expected_from_run(run_id) if run_id else expected_from_revision(revision)
    )
    root = Path(git("rev-parse", "--show-toplevel", check=True))
    from dvc.repo import Repo

    config = Repo(str(root)).config
    remote = config["core"].get("remote")
    store = reproduction_store()
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:
        worktree = Path(scratch) / "worktree"
        git("worktree", "add", "--detach", str(worktree), commit, check=True)
        try:
            print(f"reproduce: {revision or run_id} = commit {commit[:12]} in {worktree}", file=sys.stderr)
            # What `dvc cache dir --local` and `dvc remote modify --local` would write, without two more processes.
            with Repo(str(worktree)) as copy, copy.config.edit("local") as local:
                local["cache"]["dir"] = str(root / ".dvc" / "cache")
                # DVC stages dvc.lock in the worktree's own index instead of advising `git add dvc.lock`,
                # which concerns a worktree deleted at the end.
                local["core"]["autostage"] = True
                if remote:  # absolute: a relative remote URL would otherwise resolve inside the worktree
                    local["remote"][remote] = {"url": str(config["remote"][remote]["url"])}
            if params:
                apply_params(worktree, params)
            (worktree / METRICS_FILE).unlink(missing_ok=True)
            dvc(worktree, store, "repro", "--pull", "preprocess")  # data: from cache or remote, else recomputed
            # The result, recomputed for real, train then evaluate (error-analysis adds no metric).
            dvc(worktree, store, "repro", "--force", "--single-item", "train", "evaluate")
            actual = json.loads((worktree / METRICS_FILE).read_text())
            run = json.loads((worktree / RUN_FILE).read_text())["run_id"]
            fresh_environment = worktree / numerics.NUMERICS_FILE
            environment = json.loads(fresh_environment.read_text()) if fresh_environment.exists() else None
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], capture_output=True)
    where = f"MLflow run {run} in experiment {store['MLFLOW_EXPERIMENT_NAME']!r} of {store['MLFLOW_TRACKING_URI']}"
    print(f"reproduce: the reproduction is {where}", file=sys.stderr)
    if run_id:  # a run holds more metrics (per epoch, system) than the file compared
        expected = {key: expected.get(key) for key in actual}
    per_metric, default = tolerances(reference_environment, environment, tolerance)
    differing = match_metrics(expected, actual, per_metric, default)
    if differing:
        raise PipelineError(
            f"reproduction differs from {revision or run_id} in {', '.join(differing)} "
            "beyond " + ("their tolerance" if per_metric else f"tolerance {default}")
        )
    exact = all(expected.get(key) == actual.get(key) for key in actual)
    print(
        f"\nreproduce: all {len(expected)} metrics match " + ("exactly" if exact else "within tolerance"),
        file=sys.stderr,
    )


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a commit or tag whose stages to rerun (default: HEAD)")
    parser.add_argument("--run", help="an MLflow run id whose commit and overrides to rerun")
    parser.add_argument(
        "--tolerance",
        type=float,
        help="absolute tolerance for every metric (default: 0 in the reference's numeric "
        "environment, CROSS_ENVIRONMENT_TOLERANCE elsewhere)",
    )
    arguments = parser.parse_args()
    guard("reproduce", reproduce, arguments.rev, arguments.run, arguments.tolerance)


if __name__ == "__main__":
    main()
