"""`make compare`: the hyperparameter comparison, regenerated from tracked MLflow runs alone.

A run belongs to a setting when its config (seed aside) equals that preset's composition of conf/:
the `config.hash_without_seed` tag. Per setting and seed the latest finished run of committed code
counts (tag `git.dirty` false), else the latest finished run, marked in the table. Writes
reports/comparison.{md,csv,png}, which README.md links and shows. Nothing here is typed by
hand except the source article's claimed figures, shown beside the measured ones.

A store with fewer runs of a setting than the committed table (a fresh clone's, say) never
overwrites it: compare names what is missing and writes nothing, unless FORCE=1.
"""

import os
import re
import sys
import tempfile

import mlflow
import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import CONF_DIR, SETTINGS, TUNED_PRESET, training_hash
from pipeline.data_io import REPORTS_DIR, atomic_write_text, pyplot, save_figure, write_csv
from pipeline.errors import ArgumentParser, PipelineError, guard

# The source article's figures for its MLP, claimed as measured MNIST test accuracy.
CLAIMED_ACCURACY = {"default": 0.9923, "lr_x10": 0.9912, "batch_x10": 0.9911, "epochs_x10": 0.9935}
MARKDOWN_FILE = REPORTS_DIR / "comparison.md"
CSV_FILE = REPORTS_DIR / "comparison.csv"
PER_CLASS_FILE = REPORTS_DIR / "comparison_per_class.csv"
CHART_FILE = REPORTS_DIR / "comparison.png"
UNCOMMITTED_MARK = "†"


def setting_runs() -> dict[str, list[mlflow.entities.Run]]:
    """{setting: its latest finished, evaluated run per seed, of committed code when there is one}."""
    hashes = {
        training_hash([f"+experiment={name}"], without_seed=True): name
        for name in SETTINGS
        if (CONF_DIR / "experiment" / f"{name}.yaml").exists()
    }
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id()],
        output_format="list",
        filter_string="attributes.status = 'FINISHED' and metrics.test_accuracy >= 0",
        order_by=["attributes.start_time DESC"],
    )
    chosen: dict[str, dict[str, mlflow.entities.Run]] = {name: {} for name in SETTINGS}
    for run in runs:  # newest first
        setting = hashes.get(run.data.tags.get("config.hash_without_seed"))
        seed = run.data.params.get("train.seed")
        if setting and (seed not in chosen[setting] or uncommitted(chosen[setting][seed]) and not uncommitted(run)):
            chosen[setting][seed] = run
    return {
        name: sorted(by_seed.values(), key=lambda run: int(run.data.params["train.seed"]))
        for name, by_seed in chosen.items()
    }


def uncommitted(run: mlflow.entities.Run) -> bool:
    """Logged from code that no commit holds: `make reproduce RUN=` cannot rebuild it."""
    return run.data.tags.get("git.dirty") != "false"


BASELINE = "default"
CONFIDENCE = 0.95


def welch_interval(setting: np.ndarray, baseline: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """Difference of mean test accuracies (setting - baseline) and its Welch confidence interval."""
    return welch_from_summary(
        *(
            (float(np.mean(sample)), float(np.std(sample, ddof=1)) if len(sample) > 1 else np.nan, len(sample))
            for sample in (setting, baseline)
        ),
        confidence,
    )


def welch_from_summary(setting: tuple, baseline: tuple, confidence: float = CONFIDENCE) -> dict:
    """The same from (mean, sample standard deviation, n) of each side, as reports/comparison.csv holds them.

    Welch's t interval: the two settings' seeds are independent samples whose variances may differ.
    Standard error sqrt(s1²/n1 + s2²/n2) with sample variances (ddof=1); degrees of freedom by
    Welch–Satterthwaite, (s1²/n1 + s2²/n2)² / ((s1²/n1)²/(n1-1) + (s2²/n2)²/(n2-1)); the t quantile
    at (1 + confidence) / 2 from scipy.stats.t. It equals the interval scipy.stats.ttest_ind(setting,
    baseline, equal_var=False).confidence_interval(confidence) gives. Needs two seeds on each side.
    """
    from scipy import stats

    (mean, std, seeds), (baseline_mean, baseline_std, baseline_seeds) = setting, baseline
    difference = mean - baseline_mean
    if seeds < 2 or baseline_seeds < 2:
        return {"difference": difference, "low": np.nan, "high": np.nan, "dof": np.nan}
    terms = std**2 / seeds, baseline_std**2 / baseline_seeds
    error = float(np.sqrt(sum(terms)))
    if error == 0:  # every seed gave the same accuracy on both sides: no spread to widen the interval
        return {"difference": difference, "low": difference, "high": difference, "dof": np.inf}
    dof = float(sum(terms) ** 2 / (terms[0] ** 2 / (seeds - 1) + terms[1] ** 2 / (baseline_seeds - 1)))
    half = float(stats.t.ppf((1 + confidence) / 2, dof)) * error
    return {"difference": difference, "low": difference - half, "high": difference + half, "dof": dof}


def verdict(interval: dict, seeds: int, baseline_seeds: int) -> str:
    """'better' or 'worse' when the interval excludes 0, else how many seeds could not tell them apart."""
    if np.isnan(interval["low"]):
        return "needs 2 seeds of each"
    if interval["low"] > 0:
        return "better"
    if interval["high"] < 0:
        return "worse"
    counts = f"{seeds}" if seeds == baseline_seeds else f"{seeds} and {baseline_seeds}"
    return f"not distinguishable with {counts} seeds"


def seeds_for(half_width: float, std: float, baseline_std: float, baseline_seeds: int | None = None) -> int | None:
    """The fewest seeds whose 95% Welch interval would be at most ±half_width, were the spreads the
    measured ones (std, baseline_std): the same number on both sides, or the setting's alone against
    baseline_seeds of the baseline (None when no number of the setting's seeds is enough). Planning
    only: a spread measured on a few seeds is itself uncertain; the interval of the runs made decides."""
    for seeds in range(2, 10_000):
        interval = welch_from_summary((0.0, std, seeds), (0.0, baseline_std, baseline_seeds or seeds))
        if interval["high"] <= half_width:
            return seeds
        if baseline_seeds and baseline_std / np.sqrt(baseline_seeds) * stats_z() > half_width:
            return None  # the baseline's own share of the error is already too wide
    return None


def stats_z(confidence: float = CONFIDENCE) -> float:
    """The normal quantile: the t quantile's limit, below which no number of seeds brings it."""
    from scipy import stats

    return float(stats.norm.ppf((1 + confidence) / 2))


def summary_table(runs_by_setting: dict) -> pd.DataFrame:
    rows = []
    for setting, runs in runs_by_setting.items():
        if not runs and setting not in CLAIMED_ACCURACY:
            continue  # an optional preset nobody ran
        accuracies = np.array([run.data.metrics["test_accuracy"] for run in runs])
        params = runs[0].data.params if runs else {}
        rows.append(
            {
                "setting": setting,
                "model": params.get("model.name", ""),
                "epochs": params.get("train.epochs", ""),
                "batch_size": params.get("train.batch_size", ""),
                "learning_rate": params.get("train.learning_rate", ""),
                "schedule": params.get("train.schedule", "constant"),
                "hidden_units": params.get("model.hidden_units", ""),
                "n": len(runs),
                "test_accuracy_mean": accuracies.mean() if len(runs) else np.nan,
                "test_accuracy_std": accuracies.std(ddof=1) if len(runs) > 1 else np.nan,
                "claimed_test_accuracy": CLAIMED_ACCURACY.get(setting, np.nan),
                "fit_seconds_mean": np.mean([run.data.metrics.get("fit_seconds", np.nan) for run in runs])
                if runs
                else np.nan,
                **against_baseline(accuracies, runs_by_setting.get(BASELINE, []), setting),
                "run_ids": " ".join(run.info.run_id for run in runs),
                "uncommitted_run_ids": " ".join(run.info.run_id for run in runs if uncommitted(run)),
            }
        )
    return pd.DataFrame(rows)


def against_baseline(accuracies: np.ndarray, baseline_runs: list, setting: str) -> dict:
    """The table's columns for the setting's difference from the default: interval and verdict."""
    baseline = np.array([run.data.metrics["test_accuracy"] for run in baseline_runs])
    if setting == BASELINE or not len(accuracies) or not len(baseline):
        return {"difference": np.nan, "difference_low": np.nan, "difference_high": np.nan, "welch_dof": np.nan,
                "verdict": ""}  # fmt: skip
    interval = welch_interval(accuracies, baseline)
    return {
        "difference": interval["difference"],
        "difference_low": interval["low"],
        "difference_high": interval["high"],
        "welch_dof": interval["dof"],
        "verdict": verdict(interval, len(accuracies), len(baseline)),
    }


def per_class_table(runs_by_setting: dict) -> pd.DataFrame:
    """Per-digit test accuracy of each setting (mean over seeds), from the error-analysis artifacts."""
    columns = {}
    with tempfile.TemporaryDirectory() as scratch:
        for setting, runs in runs_by_setting.items():
            tables = [
                pd.read_csv(
                    mlflow.artifacts.download_artifacts(
                        run_id=run.info.run_id,
                        artifact_path="error_analysis/per_class.csv",
                        dst_path=f"{scratch}/{run.info.run_id}",
                    )
                )
                for run in runs
            ]
            if tables:
                columns[setting] = pd.concat(tables).groupby("digit").accuracy.mean()
    return pd.DataFrame(columns).rename_axis("digit")


def percent(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.2%}"


def points(value: float) -> str:
    """A difference of accuracies in percentage points, signed."""
    return f"{value * 100:+.2f}".replace("-", "−")


def against_default(row) -> str:
    """'+0.02 pp [−0.35, +0.39]: not distinguishable with 3 seeds', or what is missing."""
    if row.setting == BASELINE:
        return "(the reference)"
    if pd.isna(row.difference):
        return "—"
    if pd.isna(row.difference_low):
        return f"{points(row.difference)} pp ({row.verdict})"
    return f"{points(row.difference)} pp [{points(row.difference_low)}, {points(row.difference_high)}]: {row.verdict}"


def setting_label(setting: str) -> str:
    """The setting's name; for `make tune`'s preset, how it was chosen (its header says)."""
    chosen = re.search(r"the best of (\d+) trials", TUNED_PRESET.read_text()) if setting == "tuned" else None
    return f"tuned (best of {chosen[1]} trials, chosen on validation)" if chosen else setting


def markdown(summary: pd.DataFrame, per_class: pd.DataFrame) -> str:
    lines = [
        "| setting | model | hidden units | epochs | batch | learning rate | measured test accuracy | n "
        "| vs default: difference, 95% CI | claimed | fit time | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary.itertuples():
        measured = (
            "not run"
            if row.n == 0
            else percent(row.test_accuracy_mean) + (f" ± {row.test_accuracy_std:.2%}" if row.n > 1 else "")
        )
        fit = "—" if pd.isna(row.fit_seconds_mean) else f"{row.fit_seconds_mean:.0f} s"
        runs = ", ".join(
            f"`{run_id[:8]}`" + (UNCOMMITTED_MARK if run_id in row.uncommitted_run_ids.split() else "")
            for run_id in row.run_ids.split()
        )
        learning_rate = f"{float(row.learning_rate):.3g}" if row.learning_rate else ""
        if row.schedule != "constant":
            learning_rate += f" ({row.schedule})"
        lines.append(
            f"| {setting_label(row.setting)} | {row.model} | {row.hidden_units or '—'} | {row.epochs} | "
            f"{row.batch_size} | {learning_rate} | "
            f"{measured} | {row.n} | {against_default(row)} | {percent(row.claimed_test_accuracy)} | {fit} | {runs} |"
        )
    lines += [
        "",
        "Measured: mean ± sample standard deviation over seeds (n runs) on the official "
        "MNIST test set (10,000 images unless data.limit shrinks it). "
        "vs default: the setting's mean minus the default's, in percentage points, with its 95% confidence "
        "interval (Welch's t, Welch–Satterthwaite degrees of freedom); better or worse when the interval "
        "excludes 0, else not distinguishable with that many seeds (docs/comparison.md). "
        "Claimed: the source article's figure, not reproduced here.",
        "",
    ]
    unrebuildable = summary[summary.uncommitted_run_ids.str.len() > 0].setting
    if len(unrebuildable):
        lines += [
            f"{UNCOMMITTED_MARK} Logged from uncommitted code (tag `git.dirty`): no commit rebuilds it with "
            '`make reproduce RUN=`. Commit the code and conf/, then `make sweep SETTINGS="'
            + " ".join(unrebuildable)
            + '" FORCE=1`.',
            "",
        ]
    if not per_class.empty:
        lines += [
            "Per-digit test accuracy (mean over seeds):",
            "",
            "| digit | " + " | ".join(per_class.columns) + " |",
            "| --- |" + " --- |" * len(per_class.columns),
        ]
        lines += [
            f"| {digit} | " + " | ".join(percent(value) for value in row) + " |" for digit, row in per_class.iterrows()
        ]
    return "\n".join(lines) + "\n"


def plot(runs_by_setting: dict, summary: pd.DataFrame) -> None:
    client = mlflow.MlflowClient()
    figure, (curves, bars) = pyplot().subplots(1, 2, figsize=(12, 4.5), layout="tight")
    for setting, runs in runs_by_setting.items():
        histories = [
            [
                point.value
                for point in sorted(
                    client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda point: point.step
                )
            ]
            for run in runs
        ]
        if histories:
            length = min(map(len, histories))
            curve = np.mean([history[:length] for history in histories], axis=0)
            curves.plot(np.arange(1, length + 1), curve, marker="o" if length <= 10 else None, label=setting)
    curves.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy (mean over seeds)")
    curves.grid(alpha=0.3)
    curves.legend()
    measured = summary[summary.n > 0]
    positions = np.arange(len(measured))
    bars.bar(
        positions,
        measured.test_accuracy_mean * 100,
        yerr=measured.test_accuracy_std.fillna(0) * 100,
        capsize=4,
        label="measured",
    )
    bars.scatter(
        positions,
        measured.claimed_test_accuracy * 100,
        color="crimson",
        marker="_",
        s=400,
        zorder=3,
        label="claimed (article)",
    )
    bars.set_xticks(positions, measured.setting)
    low = np.nanmin(np.concatenate([measured.test_accuracy_mean, measured.claimed_test_accuracy])) * 100
    bars.set(ylim=(max(0, low - 1), 100), ylabel="test accuracy (%)", title="Test accuracy per setting")
    bars.grid(axis="y", alpha=0.3)
    bars.legend(loc="lower right")
    save_figure(figure, CHART_FILE)


def check_not_poorer(summary: pd.DataFrame) -> None:
    """Refuses to replace the committed table with one that has fewer runs of some setting."""
    if not CSV_FILE.exists():
        return
    committed = pd.read_csv(CSV_FILE).set_index("setting").n
    tracked = summary.set_index("setting").n
    poorer = [
        f"{setting} ({tracked.get(setting, 0)} of {count} runs)"
        for setting, count in committed.items()
        if tracked.get(setting, 0) < count
    ]
    if poorer:
        settings = " ".join(setting for setting, count in committed.items() if tracked.get(setting, 0) < count)
        raise PipelineError(
            f"the store {tracking.tracking_uri()} holds fewer runs than {CSV_FILE} for {', '.join(poorer)}; "
            f'files left as they are. Track them with `make sweep SETTINGS="{settings}" SEEDS={committed.max()}`, '
            "or write the poorer table anyway with `make compare FORCE=1`"
        )


@tracking.store_faults()
def compare(force: bool) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run is noise here
    tracking.connect(existing=True)
    runs_by_setting = setting_runs()
    summary = summary_table(runs_by_setting)
    if not force:
        check_not_poorer(summary)
    per_class = per_class_table(runs_by_setting)
    table = markdown(summary, per_class)
    write_csv(CSV_FILE, summary)
    write_csv(PER_CLASS_FILE, per_class, index=True)
    atomic_write_text(MARKDOWN_FILE, table)
    if (summary.n > 0).any():
        plot(runs_by_setting, summary)
    print(table)
    print(f"compare: wrote {MARKDOWN_FILE}, {CSV_FILE}, {PER_CLASS_FILE}, {CHART_FILE}", file=sys.stderr)


def plan(half_width_points: float) -> None:
    """Seeds per setting for a 95% interval of at most ±half_width_points against the default, from the
    spread in the committed reports/comparison.csv (the last `make compare`).

    A setting whose interval already excludes 0 is decided and needs no more seeds. The others need
    the interval's half-width at most the target: first the same number n on both sides for each, the
    default then taking the largest such n (every row compares with it), and each setting the fewest
    seeds that reach the target against that many of the default.
    """
    if not half_width_points > 0:
        raise PipelineError(
            f"--plan takes a half-width in percentage points above 0, e.g. 0.2; got {half_width_points}"
        )
    if not CSV_FILE.exists():
        raise PipelineError(f"{CSV_FILE} is missing: run `make compare` first (it measures the spread)")
    table = pd.read_csv(CSV_FILE).set_index("setting")
    measured = table[table.test_accuracy_std.notna()]
    if BASELINE not in measured.index:
        raise PipelineError(
            f"{CSV_FILE} has no spread for {BASELINE} (2 seeds at least): `make sweep SETTINGS={BASELINE} SEEDS=3`"
        )
    target = half_width_points / 100

    def summary(setting: str) -> tuple:
        row = measured.loc[setting]
        return row.test_accuracy_mean, row.test_accuracy_std, int(row.n)

    baseline = summary(BASELINE)
    undecided, lines = {}, []
    for setting in measured.index.drop(BASELINE):
        interval = welch_from_summary(summary(setting), baseline)
        decided = verdict(interval, int(measured.loc[setting, "n"]), baseline[2])
        if decided in ("better", "worse"):
            lines.append(f"  {setting:<12} {decided} already at {int(measured.loc[setting, 'n'])} seeds: no more")
        else:
            undecided[setting] = seeds_for(target, summary(setting)[1], baseline[1])
    baseline_seeds = max(undecided.values(), default=baseline[2])
    for setting in undecided:
        seeds = seeds_for(target, summary(setting)[1], baseline[1], baseline_seeds)
        lines.append(f"  {setting:<12} std {summary(setting)[1]:.2%}: {seeds} seeds")
    print(f"seeds for a 95% interval of ±{half_width_points:g} pp against {BASELINE} (from {CSV_FILE}):")
    print(f"  {BASELINE:<12} std {baseline[1]:.2%}: {baseline_seeds} seeds", *lines, sep="\n")


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force", action="store_true", help="write the table even when it has fewer runs than the committed one"
    )
    parser.add_argument(
        "--plan",
        type=float,
        metavar="POINTS",
        help="print the seeds each setting needs for a 95%% interval of ±POINTS percentage points against the "
        "default, from the committed table's spread; writes nothing",
    )
    arguments = parser.parse_args()
    if arguments.plan is not None:
        guard("compare", plan, arguments.plan)
    else:
        guard("compare", compare, arguments.force)


if __name__ == "__main__":
    main()
