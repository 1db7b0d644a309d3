"""`make numerics`: the default MLP under each numeric environment one machine can emulate.

Trains the default configuration on the full data in a throwaway copy of the committed project,
once per environment (oneDNN on or off, oneDNN's instruction set capped, TensorFlow's intra-op
thread count), evaluates it, and records the test metrics, a hash of the trained weights and the
fit time. Writes bench/numeric_environments.md: how far the metrics move when only the numeric environment
changes (what `make reproduce` tolerates across environments), and which settings, if any, give
the same weights everywhere.
"""

import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from datetime import date
from pathlib import Path

import h5py

from bench import REPO, latest_run, make_bench_project, timed

RESULTS = REPO / "bench" / "numeric_environments.md"
METRICS = ("test_accuracy", "test_loss", "f1_macro", "roc_auc_ovr")
ENVIRONMENTS = {
    "default": {},
    "default, again": {},
    "oneDNN ISA cap AVX": {"ONEDNN_MAX_CPU_ISA": "AVX"},
    "oneDNN ISA cap SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "1 intra-op thread": {"TF_NUM_INTRAOP_THREADS": "1"},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "oneDNN off, ISA cap SSE4.1": {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "oneDNN off, 1 intra-op thread": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1"},
}


def weights_digest(model_file: Path) -> str:
    """SHA-256 of the trained weights alone (the .keras archive also holds metadata and a date)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(model_file) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        weights.visititems(
            lambda name, item: (
                digest.update(name.encode() + item[()].tobytes()) if isinstance(item, h5py.Dataset) else None
            )
        )
    return digest.hexdigest()


def numerics() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in (
        "MLFLOW_TRACKING_URI",
        "DVC_ROOT",
        "TF_ENABLE_ONEDNN_OPTS",
        "ONEDNN_MAX_CPU_ISA",
        "TF_NUM_INTRAOP_THREADS",
    ):
        env.pop(key, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="numerics-") as scratch:
        project = make_bench_project(Path(scratch))
        timed(["dvc", "repro", "preprocess"], project, env)
        for name, variables in ENVIRONMENTS.items():
            print(f"numerics: {name} {variables or ''}", file=sys.stderr)
            for stage in ("train", "evaluate"):
                timed([sys.executable, "-m", f"pipeline.{stage}"], project, {**env, **variables})
            metrics = json.loads((project / "reports/metrics.json").read_text())
            fingerprint = json.loads((project / "reports/numerics.json").read_text())
            rows.append(
                {
                    "name": name,
                    "variables": variables,
                    "metrics": metrics,
                    "weights": weights_digest(project / "models/model.keras"),
                    "fit_seconds": latest_run(project)[0],
                    "fingerprint": fingerprint,
                }
            )
            print(
                f"numerics: {name}: {metrics['test_accuracy']:.4f} {metrics['test_loss']:.6f} "
                f"{rows[-1]['weights'][:12]} {rows[-1]['fit_seconds']:.1f} s",
                file=sys.stderr,
            )
    write_results(rows)


def write_results(rows: list[dict]) -> None:
    reference = rows[0]
    cpu = reference["fingerprint"]
    lines = [
        "# The default MLP across emulated numeric environments",
        "",
        f"Measured by `make numerics` on {date.today()}: {cpu['cpu.model_name']} "
        f"(family/model/stepping {cpu['cpu.family_model_stepping']}, ISA {cpu['cpu.isa']}), "
        f"{cpu['cpu.cores']} cores; TensorFlow {cpu['tensorflow.version']}.",
        "Each row trains the default configuration (MLP, 5 epochs, seed 0) on the full data and evaluates it.",
        "",
        "| environment | variables | test accuracy | test loss | F1 (macro) | ROC-AUC | weights "
        "| same weights as default | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        metrics = row["metrics"]
        variables = " ".join(f"`{key}={value}`" for key, value in row["variables"].items()) or "—"
        lines.append(
            f"| {row['name']} | {variables} | {metrics['test_accuracy']:.4f} | {metrics['test_loss']:.6f} | "
            f"{metrics['f1_macro']:.6f} | {metrics['roc_auc_ovr']:.6f} | `{row['weights'][:12]}` | "
            f"{'yes' if row['weights'] == reference['weights'] else 'no'} | {row['fit_seconds']:.1f} |"
        )
    lines += ["", "Largest difference from the default row, per metric (absolute):", ""]
    lines += [
        f"- {metric}: {max(abs(row['metrics'][metric] - reference['metrics'][metric]) for row in rows):.6f}"
        for metric in METRICS
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    numerics()
