"""`make bench`: the pipeline's cost, measured side by side with the bare Keras script, in one run.

Works in a throwaway copy of the committed project (HEAD), with MNIST from MNIST_MIRROR. Runs the
measurements interleaved and repeated (--repeats, at least 3), reports min and median, and writes
bench/results.md. Timings on a shared machine are noisy: compare the ratios, not the seconds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.md"
STAGES = ["download", "preprocess", "train", "evaluate", "error_analysis"]


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def latest_fit_seconds(project: Path) -> tuple[float, float]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["mnist"], output_format="list", max_results=1,
                             order_by=["attributes.start_time DESC"])[0]
    return run.data.metrics["fit_seconds"], run.data.metrics.get("test_accuracy", float("nan"))


def make_project(destination: Path) -> Path:
    """The committed project, as a fresh git + DVC repository."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def machine() -> str:
    sys.path.insert(0, str(REPO))
    from pipeline.numerics import fingerprint

    numeric = fingerprint()
    return (f"{numeric['cpu.model_name']} ({numeric['cpu.family_model_stepping']}; {numeric['cpu.isa']}), "
            f"{numeric['cpu.cores']} cores; TensorFlow {numeric['tensorflow.version']} "
            f"({numeric['tensorflow.build']} build), {'GPU: ' + numeric['gpu'] if 'gpu' in numeric else 'no GPU used'}; "
            f"Python {platform.python_version()}")


def summary(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f}"


def bench(repeats: int, cnn: bool) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    if not env.get("MNIST_MIRROR"):
        shared = REPO.parent / "shared" / "data" / "mnist"
        env["MNIST_MIRROR"] = str(shared) if shared.is_dir() else ""
    measured = {key: [] for key in ("bare_fit", "bare_total", "bare_accuracy", "stage_fit", "stage_accuracy",
                                     "fresh_repro", "noop_repro", "tracked_train", "untracked_train")}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        project = make_project(Path(scratch))
        print(f"bench: project copy in {project}; {repeats} interleaved repeats", file=sys.stderr)
        for repeat in range(repeats):
            seconds, _ = timed(["dvc", "repro", "--force"], project, env)
            fit, accuracy = latest_fit_seconds(project)
            measured["fresh_repro"].append(seconds)
            measured["stage_fit"].append(fit)
            measured["stage_accuracy"].append(accuracy)
            measured["noop_repro"].append(timed(["dvc", "repro"], project, env)[0])
            # The train stage alone, MLflow on and off, alternating which goes first.
            tracked = ("tracked_train", [sys.executable, "-m", "pipeline.train"])
            untracked = ("untracked_train", [sys.executable, "bench/untracked_train.py"])
            for key, command in (tracked, untracked) if repeat % 2 == 0 else (untracked, tracked):
                measured[key].append(timed(command, project, {**env, "PYTHONPATH": str(project)})[0])
            seconds, stdout = timed([sys.executable, str(REPO / "bench" / "bare_keras.py")], project, env)
            bare = json.loads(stdout.strip().splitlines()[-1])
            measured["bare_fit"].append(bare["fit_seconds"])
            measured["bare_total"].append(seconds)
            measured["bare_accuracy"].append(bare["test_accuracy"])
            print(f"bench: repeat {repeat + 1}: fresh repro {measured['fresh_repro'][-1]:.1f} s "
                  f"(fit {measured['stage_fit'][-1]:.1f} s), bare {seconds:.1f} s (fit {bare['fit_seconds']:.1f} s)",
                  file=sys.stderr)

        stages = {}
        for stage in STAGES:  # one process each, so each peak is that stage's own
            stages[stage] = wall_and_peak_memory([sys.executable, "-m", f"pipeline.{stage}"], project, env)

        cnn_line = ""
        if cnn:
            subprocess.run([sys.executable, "-m", "pipeline.config", "+experiment=cnn"], cwd=project, env=env,
                           check=True, capture_output=True)
            seconds, _ = timed(["dvc", "repro"], project, env)
            fit, accuracy = latest_fit_seconds(project)
            cnn_line = (f"| CNN preset (`+experiment=cnn`): test accuracy; fit time (`dvc repro` of train, evaluate, "
                        f"error-analysis) | {accuracy:.2%}; {fit:.0f} s ({seconds:.0f} s) | ≥ 99.5%; ≤ 300 s |\n")

    write_results(measured, stages, cnn_line, repeats)


def wall_and_peak_memory(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"bench: {' '.join(command)} failed")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # KiB -> MiB


def write_results(measured: dict, stages: dict, cnn_line: str, repeats: int) -> None:
    fit_ratio = statistics.median(measured["stage_fit"]) / statistics.median(measured["bare_fit"])
    repro_ratio = statistics.median(measured["fresh_repro"]) / statistics.median(measured["bare_total"])
    tracking_overhead = statistics.median(measured["tracked_train"]) / statistics.median(measured["untracked_train"]) - 1
    accuracy_gap = (statistics.median(measured["stage_accuracy"]) - statistics.median(measured["bare_accuracy"])) * 100
    text = f"""# Benchmark results

Measured by `make bench` on {date.today().isoformat()}: {machine()}.
{repeats} interleaved repeats; seconds as min / median. Ratios use medians.

| figure | measured | target |
| --- | --- | --- |
| train-stage fit time / bare script fit time (MLP, 5 epochs, batch 64, lr 0.001) | {fit_ratio:.2f} ({summary(measured['stage_fit'])} s vs {summary(measured['bare_fit'])} s) | ≤ 0.40 |
| test accuracy, train stage vs bare script | {statistics.median(measured['stage_accuracy']):.2%} vs {statistics.median(measured['bare_accuracy']):.2%} ({accuracy_gap:+.2f} pp) | within ±0.3 pp |
| fresh `dvc repro` of five stages / bare script total | {repro_ratio:.2f} ({summary(measured['fresh_repro'])} s vs {summary(measured['bare_total'])} s) | ≤ 1.3 |
| no-op `dvc repro` | {summary(measured['noop_repro'])} s | ≤ 2 s |
| MLflow tracking overhead, train stage on vs off (whole process) | {tracking_overhead:+.1%} ({summary(measured['tracked_train'])} s vs {summary(measured['untracked_train'])} s) | ≤ 3% |
{cnn_line}
Each stage run alone (one process; wall seconds, peak resident MiB): {', '.join(f'{stage} {wall:.1f} s, {peak:.0f} MiB' for stage, (wall, peak) in stages.items())}.

Notes: the bare script fits on all 60,000 training images; the train stage fits on 55,000 and
evaluates the 5,000-image validation split after each epoch (that is inside its fit time).
Tracking off is `bench/untracked_train.py`: the same `train()` with every MLflow call a no-op (it
also skips the history CSV and curves, built from the tracked metrics: an upper bound).
"""
    RESULTS.write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cnn", dest="cnn", action="store_false", help="skip the CNN preset (about 5 minutes)")
    arguments = parser.parse_args()
    if arguments.repeats < 3:
        parser.error("--repeats must be at least 3 (min and median need them)")
    bench(arguments.repeats, arguments.cnn)


if __name__ == "__main__":
    main()
