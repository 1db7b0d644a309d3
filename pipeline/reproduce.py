"""`make reproduce REV=<tag or commit>` or `RUN=<mlflow run id>`: recompute a result and compare.

Checks REV out into a temporary git worktree that shares this repository's DVC cache and remote,
restores the data stages from them when they are there (recomputing them otherwise), retrains,
re-evaluates and re-analyses for real (forced: no run-cache shortcut), then compares the fresh
reports/metrics.json with the expected one: the file committed at REV, or the run's metrics.

On CPU the contract is exact: the same code, config, seed, data and environment give bit-identical
metrics, so the default tolerance is 0. GPU kernels are not bit-reproducible across GPU models,
drivers or CUDA/cuDNN versions, even with op determinism: pass TOLERANCE (absolute) there.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from pipeline import tracking
from pipeline.tracking import git
from pipeline.config import PARAMS_FILE, PipelineError
from pipeline.data_io import REPORTS_DIR

METRICS_FILE = REPORTS_DIR / "metrics.json"


def expected_from_revision(revision: str) -> tuple[str, dict, None]:
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}", check=True)
    try:
        metrics = json.loads(git("show", f"{commit}:{METRICS_FILE}", check=True))
    except PipelineError:
        raise PipelineError(f"{revision} has no committed {METRICS_FILE}: nothing to compare with") from None
    return commit, metrics, None


def expected_from_run(run_id: str) -> tuple[str, dict, dict]:
    tracking.connect()
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise PipelineError(f"no run {run_id} in {tracking.tracking_uri()}") from None
    tags = run.data.tags
    if tags.get("git.dirty") != "false" or tags.get("git.commit", "unknown") == "unknown":
        raise PipelineError(f"run {run_id} was made from a working tree with uncommitted changes "
                            f"(git.dirty={tags.get('git.dirty')}): no commit holds its code. "
                            "Commit the change and run again to get a reproducible run")
    return tags["git.commit"], run.data.metrics, run.data.params


def apply_params(worktree: Path, params: dict[str, str]) -> None:
    """Writes a run's params (strings in MLflow) over the params.yaml of its commit."""
    config = OmegaConf.load(worktree / PARAMS_FILE)
    for key, value in params.items():
        OmegaConf.update(config, key, None if value == "None" else yaml.safe_load(value), force_add=False)
    (worktree / PARAMS_FILE).write_text(OmegaConf.to_yaml(config))


def dvc(worktree: Path, *arguments: str) -> None:
    # The worktree is its own DVC project: DVC_ROOT must not point back at this repository.
    env = {key: value for key, value in os.environ.items() if key != "DVC_ROOT"}
    result = subprocess.run(["dvc", *arguments], cwd=worktree, env=env)
    if result.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(arguments)}` failed in the worktree (exit {result.returncode})")


def compare(expected: dict, actual: dict, tolerance: float) -> list[str]:
    print(f"\n{'metric':<18} {'expected':>22} {'reproduced':>22}  match")
    differing = []
    for key in sorted(set(expected) | set(actual)):
        want, got = expected.get(key), actual.get(key)
        same = want == got or (isinstance(want, float) and isinstance(got, float)
                               and math.isclose(want, got, rel_tol=0, abs_tol=tolerance))
        print(f"{key:<18} {want!r:>22} {got!r:>22}  {'yes' if same else 'NO'}")
        if not same:
            differing.append(key)
    return differing


def reproduce(revision: str | None, run_id: str | None, tolerance: float) -> None:
    if bool(revision) == bool(run_id):
        raise PipelineError("give exactly one of REV=<tag or commit> or RUN=<mlflow run id>")
    commit, expected, params = expected_from_run(run_id) if run_id else expected_from_revision(revision)
    root = Path(git("rev-parse", "--show-toplevel", check=True))
    from dvc.repo import Repo

    config = Repo(str(root)).config
    remote = config["core"].get("remote")
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:
        worktree = Path(scratch) / "worktree"
        git("worktree", "add", "--detach", str(worktree), commit, check=True)
        try:
            print(f"reproduce: {revision or run_id} = commit {commit[:12]} in {worktree}", file=sys.stderr)
            dvc(worktree, "cache", "dir", "--local", str(root / ".dvc" / "cache"))
            if remote:  # a relative remote URL would otherwise resolve inside the worktree
                dvc(worktree, "remote", "modify", "--local", remote, "url", config["remote"][remote]["url"])
            if params:
                apply_params(worktree, params)
            (worktree / METRICS_FILE).unlink(missing_ok=True)
            dvc(worktree, "repro", "--pull", "preprocess")  # data: from cache or remote, else recomputed
            dvc(worktree, "repro", "--force", "--downstream", "train")  # the result: recomputed for real
            actual = json.loads((worktree / METRICS_FILE).read_text())
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], capture_output=True)
    if run_id:  # a run holds more metrics (per epoch, system) than the file compared
        expected = {key: expected.get(key) for key in actual}
    differing = compare(expected, actual, tolerance)
    if differing:
        raise PipelineError(f"reproduction differs from {revision or run_id} in {', '.join(differing)} "
                            f"(tolerance {tolerance})")
    print(f"\nreproduce: all {len(expected)} metrics match {'exactly' if tolerance == 0 else f'within {tolerance}'}",
          file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=os.environ.get("REV") or None)
    parser.add_argument("--run", default=os.environ.get("RUN") or None)
    parser.add_argument("--tolerance", type=float, default=float(os.environ.get("TOLERANCE") or 0))
    arguments = parser.parse_args()
    try:
        reproduce(arguments.rev, arguments.run, arguments.tolerance)
    except PipelineError as error:
        print(f"error: reproduce: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
