"""`make bench`: the pipeline's cost, measured side by side with the bare Keras script, in one run.

Works in a throwaway copy of the committed project (HEAD), with MNIST from MNIST_MIRROR. Runs the
measurements interleaved and repeated (--repeats, at least 3), reports min and median, and writes
bench/results.md: each target with its measured value and whether it is met. Timings on a shared
machine are noisy: compare the ratios, not the seconds.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.md"
STAGES = ["download", "preprocess", "train", "evaluate", "error_analysis"]
# The quick experiment a user runs while trying ideas, and the bare script's twin of it.
QUICK_OVERRIDES = ["train.epochs=1", "data.limit=2000"]
QUICK_BARE = ["--epochs", "1", "--limit", "2000"]
# --force: else DVC's run cache restores the repeats.
QUICK_EXPERIMENT = [
    "dvc",
    "exp",
    "run",
    "--force",
    *(argument for override in QUICK_OVERRIDES for argument in ("-S", override)),
]
CNN_SEEDS = 3
INSTALL_BEGIN, INSTALL_END = "<!-- install:begin -->", "<!-- install:end -->"
SAMPLE_SECONDS = 0.01  # how often a stage's anonymous memory is read
# Runs a module as `python -m` would and writes its peak resident KiB (Linux's VmHWM) to a file at exit.
PEAK_REPORTER = """
import atexit, runpy, sys
peak_file, module = sys.argv[1:3]
def report():
    with open("/proc/self/status") as status, open(peak_file, "w") as peak:
        peak.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(report)
sys.argv = [module]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class StageCost(NamedTuple):
    seconds: float
    resident: float  # MiB: the high-water mark of the process's resident memory (VmHWM)
    anonymous: float  # MiB: the most anonymous memory (RssAnon) seen while it ran


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def latest_run(project: Path) -> tuple[float, float]:
    """(fit seconds, test accuracy) of the newest training run in the project's store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(
        experiment_names=["mnist"], output_format="list", max_results=1, order_by=["attributes.start_time DESC"]
    )[0]
    return run.data.metrics["fit_seconds"], run.data.metrics.get("test_accuracy", float("nan"))


def make_bench_project(destination: Path, revision: str = "HEAD") -> Path:
    """The committed project (or that of another revision), as a fresh git + DVC repository."""
    destination.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def machine() -> str:
    sys.path.insert(0, str(REPO))
    from pipeline.numerics import numeric_environment

    numeric = numeric_environment()
    return (
        f"{numeric['cpu.model_name']} ({numeric['cpu.family_model_stepping']}; {numeric['cpu.isa']}), "
        f"{numeric['cpu.cores']} cores; TensorFlow {numeric['tensorflow.version']} "
        f"({numeric['tensorflow.build']} build), {'GPU: ' + numeric['gpu'] if 'gpu' in numeric else 'no GPU used'}; "
        f"Python {platform.python_version()}"
    )


def summary(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f}"


def bench_environment() -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # The cold figures with no warm process at all; measure_warm turns the default back on.
    env["PIPELINE_WARM"] = "0"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    if not env.get("MNIST_MIRROR"):
        shared = REPO.parent / "shared" / "data" / "mnist"
        env["MNIST_MIRROR"] = str(shared) if shared.is_dir() else ""
    return env


def bench(repeats: int, cnn: bool) -> None:
    env = bench_environment()
    measured = {
        key: []
        for key in (
            "bare_fit",
            "bare_total",
            "bare_accuracy",
            "stage_fit",
            "stage_accuracy",
            "fresh_repro",
            "noop_repro",
            "tracked_train",
            "tracked_fit",
            "untracked_train",
            "quick_experiment",
            "quick_bare",
            "import_keras",
            "import_keras_without_sklearn",
            "import_mlflow",
            "first_quick_experiment",
            "warm_start",
            "warm_train",
            "warm_fit",
            "warm_quick_experiment",
            "warm_fresh_repro",
        )
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        project = make_bench_project(Path(scratch))
        print(f"bench: project copy in {project}; {repeats} interleaved repeats", file=sys.stderr)
        for repeat in range(repeats):
            measure_repeat(project, env, repeat, measured)
        stages = measure_stages(project, env)
        quick_stages = measure_stages(project, env, QUICK_OVERRIDES)
        cnn_runs = measure_cnn(project, env) if cnn else []
    write_results(measured, stages, quick_stages, cnn_runs, repeats)


def measure_repeat(project: Path, env: dict, repeat: int, measured: dict) -> None:
    seconds, _ = timed(["dvc", "repro", "--force"], project, env)
    fit, accuracy = latest_run(project)
    measured["fresh_repro"].append(seconds)
    measured["stage_fit"].append(fit)
    measured["stage_accuracy"].append(accuracy)
    measured["noop_repro"].append(timed(["dvc", "repro"], project, env)[0])
    # The train stage alone, MLflow on and off, alternating which goes first.
    tracked = ("tracked_train", [sys.executable, "-m", "pipeline.train"])
    untracked = ("untracked_train", [sys.executable, "bench/untracked_train.py"])
    for key, command in (tracked, untracked) if repeat % 2 == 0 else (untracked, tracked):
        measured[key].append(timed(command, project, {**env, "PYTHONPATH": str(project)})[0])
        if key == "tracked_train":
            measured["tracked_fit"].append(latest_run(project)[0])
    seconds, stdout = timed([sys.executable, str(REPO / "bench" / "bare_keras.py")], project, env)
    bare = json.loads(stdout.strip().splitlines()[-1])
    measured["bare_fit"].append(bare["fit_seconds"])
    measured["bare_total"].append(seconds)
    measured["bare_accuracy"].append(bare["test_accuracy"])
    # The quick experiment: all five stages.
    measured["quick_experiment"].append(timed(QUICK_EXPERIMENT, project, env)[0])
    measured["quick_bare"].append(
        timed([sys.executable, str(REPO / "bench" / "bare_keras.py"), *QUICK_BARE], project, env)[0]
    )
    # The floor under every stage that loads a model or logs to MLflow: a fresh process's imports.
    measured["import_keras"].append(timed([sys.executable, "-c", "import keras, tensorflow"], project, env)[0])
    # As the train stage imports Keras: without scikit-learn (pipeline/train.py says why).
    without_sklearn = "import sys; sys.modules['sklearn'] = None; import keras, tensorflow"
    measured["import_keras_without_sklearn"].append(timed([sys.executable, "-c", without_sklearn], project, env)[0])
    measured["import_mlflow"].append(
        timed([sys.executable, "-c", "import mlflow.store.tracking.sqlalchemy_store"], project, env)[0]
    )
    back_to_committed_setting(project, env)  # the experiment left its params and outputs in the workspace
    measure_warm(project, env, measured)
    print(
        f"bench: repeat {repeat + 1}: fresh repro {measured['fresh_repro'][-1]:.1f} s "
        f"(fit {measured['stage_fit'][-1]:.1f} s), bare {seconds:.1f} s (fit {bare['fit_seconds']:.1f} s), "
        f"quick experiment {measured['quick_experiment'][-1]:.1f} s; with the warm process on by default: "
        f"first quick experiment {measured['first_quick_experiment'][-1]:.1f} s, "
        f"the next {measured['warm_quick_experiment'][-1]:.1f} s, fresh repro {measured['warm_fresh_repro'][-1]:.1f} s",
        file=sys.stderr,
    )


def measure_warm(project: Path, env: dict, measured: dict) -> None:
    """The warm process as a user meets it, with nothing typed: the first quick experiment runs cold and
    starts it in the background; the quick experiments after it, the train stage and a fresh repro run
    as its forks."""
    env = {**env, "PIPELINE_WARM": "1"}  # the default outside CI, whatever the bench runs under
    try:
        measured["first_quick_experiment"].append(timed(QUICK_EXPERIMENT, project, env)[0])
        measured["warm_start"].append(warm_ready_seconds(project))  # the user edits meanwhile
        measured["warm_quick_experiment"].append(timed(QUICK_EXPERIMENT, project, env)[0])
        back_to_committed_setting(project, env)
        measured["warm_train"].append(timed([sys.executable, "-m", "pipeline.train"], project, env)[0])
        measured["warm_fit"].append(latest_run(project)[0])
        measured["warm_fresh_repro"].append(timed(["dvc", "repro", "--force"], project, env)[0])
        served = (project / ".dvc/tmp/warm/log").read_text().count(" exit 0 after ")
        if served < 2 * len(STAGES) + 3:  # the second quick experiment, the train stage and the repro
            sys.exit(f"bench: the warm process ran {served} stages: see {project / '.dvc/tmp/warm/log'}")
    finally:
        timed([sys.executable, "-m", "commands.warm", "stop"], project, env)
        (project / ".dvc/tmp/warm/log").unlink(missing_ok=True)


def warm_ready_seconds(project: Path, seconds: float = 600) -> float:
    """Waits until the warm process the first stage started is ready; returns how long it took to start
    (its log's "ready in ... s")."""
    log, deadline = project / ".dvc/tmp/warm/log", time.monotonic() + seconds
    while not (ready := re.search(r"warm: ready in ([\d.]+) s", log.read_text() if log.exists() else "")):
        if time.monotonic() > deadline:
            sys.exit(f"bench: no warm process became ready in {seconds:.0f} s: see {log}")
        time.sleep(0.5)
    return float(ready[1])


def measure_install(baseline: str | None, repeats: int) -> None:
    """The install on a CPU machine as a new user meets it, for this commit and for `baseline`: a fresh
    clone's `make` install (its wall time, pip's cache off, so every wheel is fetched), the venv's size
    after `make run` (du), Keras with TensorFlow imported in a fresh process (the evaluate stage's imports), and
    what `make test`'s install adds. Writes the install section of bench/results.md."""
    env = bench_environment()
    env["PIP_NO_CACHE_DIR"] = "1"
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        part for part in env["PATH"].split(os.pathsep) if part != str(Path(sys.executable).parent)
    )
    revisions = {"this commit": "HEAD", **({f"before ({baseline})": baseline} if baseline else {})}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-install-") as scratch:
        projects = {
            label: make_bench_project(Path(scratch) / str(index), rev)
            for index, (label, rev) in enumerate(revisions.items())
        }
        for label, project in projects.items():
            install = timed(["make", "GPU=0", ".venv/.installed"], project, env)[0]
            lock = (project / "requirements.lock").read_text()
            timed(["make", "GPU=0", "run"], project, env)
            results[label] = {"install": install, "size": du_gib(project / ".venv"), "lock": lock, "imports": []}
            print(
                f"bench: {label}: installed in {install:.0f} s, {results[label]['size']:.2f} GiB after `make run`",
                file=sys.stderr,
            )
        for _ in range(repeats):  # interleaved
            for label, project in projects.items():
                python = str(project / ".venv" / "bin" / "python")
                results[label]["imports"].append(timed([python, "-c", "import keras, tensorflow"], project, env)[0])
        here = projects["this commit"]
        dev_install = timed(["make", "GPU=0", ".venv/.installed-dev"], here, env)[0]
        dev_size = du_gib(here / ".venv")
    rows = [
        f"| {label} | {tensorflow_in(result['lock'])} | {result['install']:.0f} s | {result['size']:.2f} GiB "
        f"| {summary(result['imports'])} s |"
        for label, result in results.items()
    ]
    section = (
        f"{INSTALL_BEGIN}\n## Install (CPU machine)\n\n"
        f'Measured by `make bench BENCH_ARGS="--install-only{" --install-baseline " + baseline if baseline else ""}"` '
        f"on {date.today().isoformat()}: {machine()}. Each revision in a fresh copy: `make`'s install with pip's "
        f"cache off (one install each: its time moves with the package index and the machine's load), the "
        f"venv's size (du) after `make run`, and {repeats} interleaved fresh processes importing Keras with "
        "TensorFlow (seconds as min / median).\n\n"
        "| revision | TensorFlow | install (`make run`'s) | venv after `make run` | import keras, tensorflow |\n"
        "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n"
        f"`make test` then adds requirements-dev.lock (tests, lint, docs) in {dev_install:.0f} s: "
        f"{dev_size:.2f} GiB in all.\n{INSTALL_END}"
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if INSTALL_BEGIN in text:
        text = re.sub(f"{INSTALL_BEGIN}.*?{INSTALL_END}", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(section)


def tensorflow_in(lock: str) -> str:
    return "tensorflow-cpu" if re.search(r"^tensorflow[-_]cpu==", lock, re.M) else "tensorflow (CUDA build)"


def du_gib(path: Path) -> float:
    """Disk usage as du counts it (allocated blocks), in GiB."""
    return (
        int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])
        / 2**20
    )


def measure_stages(project: Path, env: dict, overrides: list[str] = ()) -> dict[str, StageCost]:
    """Wall seconds and memory peaks of each stage run alone, one process each (so each peak is its own),
    on the committed params or on those with `overrides`."""
    if overrides:
        timed([sys.executable, "-m", "pipeline.config", *overrides], project, env)
        timed(["dvc", "repro"], project, env)  # every stage's inputs for this setting
    stages = {stage: wall_and_peak_memory(stage, project, env) for stage in STAGES}
    if overrides:
        back_to_committed_setting(project, env)
    return stages


def back_to_committed_setting(project: Path, env: dict) -> None:
    """The committed params.yaml and dvc.lock, and their outputs back from DVC's cache."""
    subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock"], cwd=project, check=True)
    timed(["dvc", "repro"], project, env)


def measure_cnn(project: Path, env: dict) -> list[tuple[float, float]]:
    """(fit seconds, test accuracy) of the CNN preset for each of CNN_SEEDS seeds."""
    runs = []
    for seed in range(CNN_SEEDS):
        timed([sys.executable, "-m", "pipeline.config", "+experiment=cnn", f"train.seed={seed}"], project, env)
        timed(["dvc", "repro"], project, env)
        runs.append(latest_run(project))
        print(f"bench: CNN seed {seed}: fit {runs[-1][0]:.0f} s, test accuracy {runs[-1][1]:.2%}", file=sys.stderr)
    return runs


def wall_and_peak_memory(stage: str, cwd: Path, env: dict) -> StageCost:
    """Wall time and memory peaks of one stage in its own process.

    The stage reports its own resident peak (VmHWM, the high-water mark of its address space after
    exec): a child's ru_maxrss also counts the pages of the process it was forked from (the kernel
    records the old address space's high-water mark at exec), so a small stage would read as the
    size of this bench process. VmHWM also counts library pages the kernel mapped in around each
    page fault from the page cache, so it moves with what the cache holds (docs/performance.md); Linux
    keeps no high-water mark of anonymous memory alone (what the stage allocates), so this samples
    RssAnon every SAMPLE_SECONDS.
    """
    with tempfile.NamedTemporaryFile(mode="r") as peak:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-c", PEAK_REPORTER, peak.name, f"pipeline.{stage}"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        anonymous = 0
        while process.poll() is None:
            anonymous = max(anonymous, anonymous_kib(process.pid))
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            sys.exit(f"bench: the {stage} stage failed")
        return StageCost(seconds, int(peak.read()) / 1024, anonymous / 1024)  # KiB -> MiB


def anonymous_kib(pid: int) -> int:
    """The process's RssAnon, 0 once it has exited (a zombie's status has no memory lines)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("RssAnon:")), 0)
    except FileNotFoundError:
        return 0


def previous_peaks() -> dict[str, tuple[float, float | None]]:
    """Each stage's (resident, anonymous) peak MiB in the results file this run replaces (none on a
    first run; no anonymous figure in results written before it was measured)."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    return {
        stage: (float(resident), float(anonymous) if anonymous else None)
        for stage, resident, anonymous in re.findall(
            r"(\w+) [\d.]+ s, (\d+) MiB(?: resident, (\d+) MiB anonymous)?", text
        )
    }


def memory_row(stage: str, cost: StageCost, before: dict) -> str:
    """A stage's peaks against the previous results' plus 5% (measurement noise), each where there is one."""
    figure = f"peak memory, {stage} stage alone: resident / anonymous"
    measured = f"{cost.resident:.0f} / {cost.anonymous:.0f} MiB ({cost.seconds:.1f} s)"
    if stage not in before:
        return f"| {figure} | {measured} | - | - |"
    targets = [None if previous is None else round(previous * 1.05) for previous in before[stage]]
    met = all(
        value <= target
        for value, target in zip((cost.resident, cost.anonymous), targets, strict=False)
        if target is not None
    )
    previous, limits = (
        " / ".join("-" if value is None else f"{value:.0f}" for value in values) for values in (before[stage], targets)
    )
    return (
        f"| {figure} (previous results: {previous} MiB) | {measured} | ≤ {limits} MiB | {'met' if met else 'not met'} |"
    )


def row(figure: str, value: float, shown: str, target: float, at_most: bool = True, unit: str = "") -> str:
    met = value <= target if at_most else value >= target
    return f"| {figure} | {shown} | {'≤' if at_most else '≥'} {target:g}{unit} | {'met' if met else 'not met'} |"


def write_results(measured: dict, stages: dict, quick_stages: dict, cnn_runs: list, repeats: int) -> None:
    # Times: the fastest repeat of each. Other processes only ever add time, so the fastest of the
    # interleaved repeats is the least disturbed (timeit's reasoning:
    # https://docs.python.org/3/library/timeit.html#timeit.Timer.repeat); a median of three still
    # moved a ratio by half when a shared machine slowed a third of the runs. Accuracies: medians.
    fastest = {key: min(values) for key, values in measured.items()}
    median = {key: statistics.median(values) for key, values in measured.items()}
    fixed_cost = min(wall - fit for wall, fit in zip(measured["tracked_train"], measured["tracked_fit"], strict=False))
    warm_fixed_cost = min(wall - fit for wall, fit in zip(measured["warm_train"], measured["warm_fit"], strict=False))
    bare_fixed_cost = min(total - fit for total, fit in zip(measured["bare_total"], measured["bare_fit"], strict=False))
    accuracy_gap = (median["stage_accuracy"] - median["bare_accuracy"]) * 100
    rows = [
        row(
            "train-stage fit / bare script fit (MLP, 5 epochs, batch 64, lr 0.001)",
            fastest["stage_fit"] / fastest["bare_fit"],
            f"{fastest['stage_fit'] / fastest['bare_fit']:.2f} ({summary(measured['stage_fit'])} s vs "
            f"{summary(measured['bare_fit'])} s)",
            0.40,
        ),
        row(
            "test accuracy, train stage minus bare script",
            abs(accuracy_gap),
            f"{median['stage_accuracy']:.2%} vs {median['bare_accuracy']:.2%} ({accuracy_gap:+.2f} pp)",
            0.3,
            unit=" pp",
        ),
        row(
            "train stage whole process / bare script whole process",
            fastest["tracked_train"] / fastest["bare_total"],
            f"{fastest['tracked_train'] / fastest['bare_total']:.2f} ({summary(measured['tracked_train'])} s vs "
            f"{summary(measured['bare_total'])} s)",
            0.60,
        ),
        row(
            "fixed cost per training (train stage outside `fit`, tracking on)",
            fixed_cost,
            f"{fixed_cost:.1f} s (bare script outside its `fit`: {bare_fixed_cost:.1f} s)",
            5,
            unit=" s",
        ),
        row(
            "MLflow tracking overhead, train stage on vs off (whole process)",
            (fastest["tracked_train"] / fastest["untracked_train"] - 1) * 100,
            f"{fastest['tracked_train'] / fastest['untracked_train'] - 1:+.1%} ({summary(measured['tracked_train'])} s "
            f"vs {summary(measured['untracked_train'])} s)",
            3,
            unit="%",
        ),
        row(
            f"quick experiment, `dvc exp run --force -S {' -S '.join(QUICK_OVERRIDES)}` (five stages)",
            fastest["quick_experiment"],
            f"{summary(measured['quick_experiment'])} s",
            10,
            unit=" s",
        ),
        row(
            "quick experiment / bare script on the same 2,000 images, one epoch",
            fastest["quick_experiment"] / fastest["quick_bare"],
            f"{fastest['quick_experiment'] / fastest['quick_bare']:.2f} ({summary(measured['quick_bare'])} s bare)",
            2.5,
        ),
        row(
            "fresh `dvc repro --force` of five stages / bare script whole process",
            fastest["fresh_repro"] / fastest["bare_total"],
            f"{fastest['fresh_repro'] / fastest['bare_total']:.2f} ({summary(measured['fresh_repro'])} s)",
            1.3,
        ),
        row("no-op `dvc repro`", fastest["noop_repro"], f"{summary(measured['noop_repro'])} s", 2, unit=" s"),
        # The warm process on by default: the first stage that finds none starts it in the background.
        row(
            "first quick experiment, cold (it starts the warm process in the background)",
            fastest["first_quick_experiment"],
            f"{summary(measured['first_quick_experiment'])} s (without starting one: "
            f"{summary(measured['quick_experiment'])} s)",
            18,
            unit=" s",
        ),
        row(
            "second and later quick experiments (no `make warm` typed: the first started it)",
            fastest["warm_quick_experiment"],
            f"{summary(measured['warm_quick_experiment'])} s",
            8,
            unit=" s",
        ),
        row(
            "second and later quick experiments / bare script on the same 2,000 images",
            fastest["warm_quick_experiment"] / fastest["quick_bare"],
            f"{fastest['warm_quick_experiment'] / fastest['quick_bare']:.2f}",
            1.5,
        ),
        row(
            "with the warm process up: train stage whole process / bare script whole process",
            fastest["warm_train"] / fastest["bare_total"],
            f"{fastest['warm_train'] / fastest['bare_total']:.2f} ({summary(measured['warm_train'])} s)",
            0.60,
        ),
        row(
            "with the warm process up: fixed cost per training (train stage outside `fit`, tracking on)",
            warm_fixed_cost,
            f"{warm_fixed_cost:.1f} s",
            3,
            unit=" s",
        ),
        row(
            "with the warm process up: fresh `dvc repro --force` / bare script whole process",
            fastest["warm_fresh_repro"] / fastest["bare_total"],
            f"{fastest['warm_fresh_repro'] / fastest['bare_total']:.2f} ({summary(measured['warm_fresh_repro'])} s)",
            1.3,
        ),
        f"| the warm process's start-up, in the background of the first experiment (it stays up until "
        f"30 minutes without a stage) | {summary(measured['warm_start'])} s | - | - |",
        # No targets: where the time outside the arithmetic goes, measured in the same run.
        f"| a fresh Python process importing Keras with TensorFlow (the evaluate stage, the bare script) "
        f"| {summary(measured['import_keras'])} s | - | - |",
        f"| the same without the scikit-learn import Keras makes for its wrappers (the train stage) "
        f"| {summary(measured['import_keras_without_sklearn'])} s | - | - |",
        f"| a fresh Python process importing MLflow and its SQLite store (train, evaluate, error-analysis) "
        f"| {summary(measured['import_mlflow'])} s | - | - |",
        f"| the quick experiment's stages, each run alone | "
        f"{', '.join(f'{stage} {cost.seconds:.1f}' for stage, cost in quick_stages.items())} s "
        f"(sum {sum(cost.seconds for cost in quick_stages.values()):.1f} s; "
        "each stage module in a fresh Python process, as DVC runs it, "
        f"without DVC's own start-up and the params stage) | - | - |",
    ]
    if cnn_runs:
        accuracies = [accuracy for _, accuracy in cnn_runs]
        cnn_fit = min(fit for fit, _ in cnn_runs)  # the seeds cost the same: the fastest is the least disturbed
        rows += [
            row(
                f"CNN preset (`+experiment=cnn`): test accuracy, mean of {len(cnn_runs)} seeds",
                statistics.mean(accuracies) * 100,
                f"{statistics.mean(accuracies):.2%} ({', '.join(f'{value:.2%}' for value in accuracies)})",
                99.5,
                at_most=False,
                unit="%",
            ),
            row(
                "CNN preset fit / default MLP's fit",
                cnn_fit / fastest["stage_fit"],
                f"{cnn_fit / fastest['stage_fit']:.1f} ({cnn_fit:.0f} s, the fastest of {len(cnn_runs)} seeds)",
                12,
            ),
        ]
    before = previous_peaks()
    rows += [memory_row(stage, cost, before) for stage, cost in stages.items()]
    stage_costs = ", ".join(
        f"{stage} {cost.seconds:.1f} s, {cost.resident:.0f} MiB resident, {cost.anonymous:.0f} MiB anonymous"
        for stage, cost in stages.items()
    )
    text = (
        f"""# Benchmark results

Measured by `make bench` on {date.today().isoformat()}: {machine()}.
{repeats} interleaved repeats; seconds as min / median. Ratios of times use the fastest repeat (min),
accuracies the median.

| figure | measured | target | met |
| --- | --- | --- | --- |
"""
        + "\n".join(rows)
        + f"""

Each stage run alone (one process; wall seconds, peaks): {stage_costs}.
Peak memory targets: the previous results' peaks plus 5% (measurement noise). Resident: the stage's VmHWM, which
also counts library pages mapped from the page cache; anonymous: the most RssAnon seen, sampled every
{SAMPLE_SECONDS * 1000:.0f} ms.

Notes: the bare script fits on all 60,000 training images; the train stage fits on 55,000 and
evaluates the 5,000-image validation split after each epoch (that is inside its fit time).
Tracking off is `bench/untracked_train.py`: the same `train()` with every MLflow call a no-op (it
also skips the history CSV and curves, built from the tracked metrics: an upper bound).
"""
    )
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    if INSTALL_BEGIN in previous:  # measured by --install-only, kept until that runs again
        text += "\n" + previous[previous.index(INSTALL_BEGIN) : previous.index(INSTALL_END) + len(INSTALL_END)] + "\n"
    RESULTS.write_text(text)
    page = REPO / "docs/performance.md"  # shows the same table
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    table = text[text.index("| figure |") : text.index("\n\n", text.index("| figure |"))]
    page.write_text(re.sub(f"{begin}.*?{end}", lambda _: f"{begin}\n{table}\n{end}", page.read_text(), flags=re.S))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-cnn",
        dest="cnn",
        action="store_false",
        help=f"skip the CNN preset ({CNN_SEEDS} seeds, about 2 minutes each on 2 cores)",
    )
    parser.add_argument(
        "--install-only",
        action="store_true",
        help="measure only the install (fresh installs from the package index, `make run`, imports) and "
        "rewrite that section of bench/results.md; about 10 minutes with a baseline",
    )
    parser.add_argument(
        "--install-baseline",
        metavar="REV",
        help="with --install-only: also measure the install of this revision (e.g. the commit before a lock change)",
    )
    arguments = parser.parse_args()
    if arguments.repeats < 3:
        parser.error("--repeats must be at least 3 (min and median need them)")
    if arguments.install_baseline and not arguments.install_only:
        parser.error("--install-baseline goes with --install-only")
    if arguments.install_only:
        measure_install(arguments.install_baseline, arguments.repeats)
    else:
        bench(arguments.repeats, arguments.cnn)


if __name__ == "__main__":
    main()
