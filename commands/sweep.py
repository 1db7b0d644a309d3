"""`make sweep`: the reference hyperparameter settings as queued DVC experiments.

Each setting x seed becomes one `dvc exp run --queue -n <setting>-seed<seed> -S +experiment=<setting>`;
the queue then runs (JOBS workers, each with its own GPU when there are GPUs), each experiment
logging its own MLflow run (named after the experiment and tagged with the sweep). A setting
already tracked for the same config, code and data is skipped unless --force: the comparison
reads runs, it does not need them twice.
"""

import os
import re
import subprocess
import sys
import time

import mlflow

from pipeline import tracking
from pipeline.config import CONF_DIR, SETTINGS, TUNED_PRESET, training_hash
from pipeline.errors import ArgumentParser, PipelineError, guard


@tracking.store_faults()
def sweep(settings: list[str], seeds: int, jobs: int, devices: list[str], force: bool) -> None:
    tracking.check_git_identity()
    tracking.connect()
    commit = tracking.git("rev-parse", "HEAD")
    code_is_clean = not tracking.git("status", "--porcelain", "--", *tracking.RESULT_INPUTS)
    sweep_id = time.strftime("sweep-%Y%m%d-%H%M%S")
    queued = {}
    for setting in settings:
        for seed in range(seeds):
            name = f"{setting}-seed{seed}"
            overrides = [f"+experiment={setting}", f"train.seed={seed}"]
            hash_ = training_hash(overrides)
            existing = tracked_run_id(hash_, commit) if code_is_clean and not force else None
            if existing:
                print(
                    f"sweep: {name} already tracked as run {existing} (same config and commit); "
                    "skipping (FORCE=1 to retrain)",
                    file=sys.stderr,
                )
                continue
            queue_experiment(name, setting, overrides, force)
            queued[name] = hash_
    if not queued:
        print("sweep: nothing to run; `make compare` tabulates the tracked runs", file=sys.stderr)
        return
    print(f"sweep: running {len(queued)} experiments ({sweep_id}), {jobs} at a time", file=sys.stderr)
    # Queue workers inherit this environment: the train stage tags each run with the sweep.
    os.environ["PIPELINE_SWEEP"] = sweep_id
    start_workers(jobs, devices)
    # Follows the queued experiments to their end (the workers are already there: it starts none).
    subprocess.run(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], check=True)

    # DVC restores a stage it has run before with the same inputs from its run cache, without
    # executing it: such an experiment logs nothing new, and its earlier run stands for it, if that
    # run is of committed code (`make reproduce RUN=` rebuilds only those).
    missing, uncommitted = [], []
    for name, hash_ in queued.items():
        new = tracked_run_id(hash_, commit=None, sweep=sweep_id)
        earlier = new or tracked_run_id(hash_, commit=None, clean=True)
        if earlier and not new:
            print(f"sweep: {name} was restored from DVC's run cache; its run is {earlier}", file=sys.stderr)
        elif not earlier:
            (uncommitted if tracked_run_id(hash_, commit=None) else missing).append(name)
    if missing:
        raise PipelineError(
            f"no finished MLflow run for {', '.join(missing)} in {tracking.tracking_uri()}; "
            "see `dvc queue logs <name>`, or retrain with FORCE=1"
        )
    if uncommitted:
        settings = " ".join(sorted({name.rsplit("-seed", 1)[0] for name in uncommitted}))
        raise PipelineError(
            f"DVC restored {', '.join(uncommitted)} from its run cache, and the only run of that "
            "config was logged from uncommitted code (tag git.dirty), which `make reproduce RUN=` "
            f'cannot rebuild; retrain with `make sweep SETTINGS="{settings}" FORCE=1`'
        )
    print(f"sweep: {len(queued)} experiments tracked; `make compare` tabulates them", file=sys.stderr)


def queue_experiment(name: str, setting: str, overrides: list[str], force: bool) -> None:
    """Queues one experiment: DVC stashes the workspace as it is now, and the experiment runs that."""
    # A finished experiment of the same name would make DVC refuse the new one.
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True)
    command = ["dvc", "exp", "run", "--queue", "--name", name]
    # DVC's stash holds the files git tracks: a preset git does not track yet (tuned.yaml before it
    # is committed) goes along with --copy-paths, which copies it when the experiment starts. Only
    # then: a tracked preset copied at the start would be the file as edited since it was queued.
    preset = f"conf/experiment/{setting}.yaml"
    if not tracking.git("ls-files", "--", preset):
        command += ["--copy-paths", preset]
    command += [argument for override in overrides for argument in ("--set-param", override)]
    subprocess.run(command + (["--force"] if force else []), check=True)


def start_workers(jobs: int, devices: list[str]) -> None:
    """Starts the queue's workers one at a time, worker k seeing only devices[k mod len(devices)].

    `dvc queue start --jobs k` starts worker k alone when 1..k-1 are up, in the calling
    environment: that is what gives each worker its own CUDA_VISIBLE_DEVICES.
    """
    for number in range(1, jobs + 1):
        environment = dict(os.environ)
        if devices:
            environment["CUDA_VISIBLE_DEVICES"] = devices[(number - 1) % len(devices)]
        subprocess.run(
            ["dvc", "queue", "start", "--jobs", str(number)], env=environment, check=True, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while queue_workers() < number:  # wait until it is up, or the next call would start it again
            if time.monotonic() > deadline:
                raise PipelineError(f"DVC queue worker {number} did not start within 60 s; see `dvc queue status`")
            time.sleep(0.5)
        if devices:
            print(
                f"sweep: queue worker {number} uses CUDA_VISIBLE_DEVICES={environment['CUDA_VISIBLE_DEVICES']}",
                file=sys.stderr,
            )


def queue_workers() -> int:
    status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True, check=True).stdout
    counts = re.search(r"Worker status: (\d+) active, (\d+) idle", status)
    if not counts:  # a DVC whose `queue status` words it differently
        raise PipelineError(f"cannot read the worker count from `dvc queue status`: {status.strip()[-200:]!r}")
    return int(counts[1]) + int(counts[2])


def visible_gpus() -> list[str]:
    """The GPUs nvidia-smi lists (none without it): by default one per queue worker, round robin."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return listed.split()


def tracked_run_id(hash_: str, commit: str | None, sweep: str | None = None, clean: bool = False) -> str | None:
    """The newest finished, evaluated run with this config hash (from this commit, or sweep; clean:
    logged from committed code, as a commit's runs always are)."""
    conditions = [f"tags.`config.hash` = '{hash_}'", "attributes.status = 'FINISHED'", "metrics.test_accuracy >= 0"]
    if commit:
        conditions.append(f"tags.`git.commit` = '{commit}'")
    if commit or clean:
        conditions.append("tags.`git.dirty` = 'false'")
    if sweep:
        conditions.append(f"tags.sweep = '{sweep}'")
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        output_format="list",
        max_results=1,
        filter_string=" and ".join(conditions),
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "settings",
        nargs="*",
        default=SETTINGS[:4],
        help=f"from conf/experiment/ (default: the four reference settings; all: {', '.join(SETTINGS)})",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each setting")
    parser.add_argument("--jobs", type=int, default=1, help="parallel queue workers")
    parser.add_argument(
        "--devices",
        help="GPU indices for the queue workers, e.g. 0,1: worker k gets one of them as its "
        "CUDA_VISIBLE_DEVICES, round robin (default: every GPU nvidia-smi lists)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even when a tracked run exists")
    arguments = parser.parse_args()

    def checked_sweep() -> None:
        if arguments.seeds < 1 or arguments.jobs < 1:
            raise PipelineError("--seeds and --jobs must be >= 1")
        unknown = sorted(set(arguments.settings) - set(SETTINGS))
        if unknown:
            raise PipelineError(f"unknown setting {unknown[0]!r}; allowed: {', '.join(SETTINGS)} (conf/experiment/)")
        if "tuned" in arguments.settings and not TUNED_PRESET.exists():
            raise PipelineError(
                f"{TUNED_PRESET.relative_to(CONF_DIR.parent)} does not exist yet: `make tune` writes it"
            )
        devices = arguments.devices.split(",") if arguments.devices else visible_gpus()
        try:
            sweep(arguments.settings, arguments.seeds, arguments.jobs, devices, arguments.force)
        except subprocess.CalledProcessError as error:
            raise PipelineError(
                f"`{' '.join(error.cmd)}` failed (exit {error.returncode}); see its output above"
            ) from None

    # Ctrl-C stops this command, not DVC's queue workers (processes of their own): they go on with what is queued.
    interrupted = (
        "the experiments already queued go on in DVC's queue (`dvc queue status`): to stop them, `dvc queue "
        "remove --queued` and `dvc queue stop --kill`; `make sweep` again skips the settings tracked by then"
    )
    guard("sweep", checked_sweep, interrupted=interrupted)


if __name__ == "__main__":
    main()
