"""The pipeline's files: where they live, IDX parsing, arrays without pickle, atomic writes.

Every output is written to a temporary name beside its destination and renamed into place,
so a failed or killed stage never leaves a half-written file that looks complete. The stages that
log to MLflow stage all their outputs (staged_outputs) and land them only after the logging
succeeded: files, dvc.lock and the tracking store never disagree after a failure.
"""

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

# The paths dvc.yaml declares, relative to the workspace DVC runs the stage in.
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
PREDICTIONS_FILE = Path("data/predictions/test_probabilities.npy")
MODEL_FILE = Path("models/model.keras")
RUN_FILE = Path("models/run.json")
REPORTS_DIR = Path("reports")
METRICS_FILE = REPORTS_DIR / "metrics.json"
HISTORY_FILE = REPORTS_DIR / "training_history.csv"
CURVES_FILE = REPORTS_DIR / "training_curves.png"

MANIFEST_FILE = PREPARED_DIR / "manifest.json"

# What shapes a trained model's weights besides params.yaml and data/prepared: the train stage's code
# (with the defaults its process applies) and the packages it runs on. dvc.yaml's train stage depends
# on exactly these (tests/test_layout.py checks); the checkpoint key hashes them, a run whose commit
# differs in them is tagged dirty, and a warm process started under other locks is not used.
TRAINING_INPUTS = (
    "pipeline/train.py",
    "pipeline/__init__.py",
    "pipeline/runtime.py",
    "pipeline/models.py",
    "pipeline/data_io.py",
    "pipeline/numerics.py",
    "pipeline/tracking.py",
    "requirements.lock",
    "requirements-gpu.lock",
)

SPLITS = ("train", "validation", "test")
IMAGE_SHAPE = (28, 28)
DIGITS = list(range(10))  # the classes
NUM_CLASSES = len(DIGITS)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic numbers: 0x08 (unsigned byte) data, then the number of dimensions.
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yields a temporary path to write; renames it onto `destination` only on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: Keras and numpy choose the format from it.
    temporary = destination.with_name(f".tmp-{os.getpid()}-{destination.name}")
    try:
        yield temporary
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


class StagedOutputs:
    """`staged / destination` is where to write an output; it lands on `destination` at the end."""

    def __init__(self, root: Path):
        self.root = root

    def __truediv__(self, destination: Path) -> Path:
        # Fail now, before anything is logged, if a file stands where the output's folder must be.
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        return self.root / destination


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Outputs written under a scratch folder, renamed onto their destinations only if the block succeeds."""
    root = Path(tempfile.mkdtemp(prefix=".staged-", dir="."))
    try:
        yield StagedOutputs(root)
        for staged in sorted(path for path in root.rglob("*") if path.is_file()):
            os.replace(staged, staged.relative_to(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    with atomic_path(destination) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(destination: Path, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))


def write_json(destination: Path, content: Any) -> None:
    atomic_write_text(destination, json.dumps(content, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    require(path)
    return json.loads(Path(path).read_text(encoding="utf-8"))


def require(path: Path) -> Path:
    """Fails with the fix when an upstream output is missing."""
    if not Path(path).exists():
        raise PipelineError(f"missing upstream output {path}; run `dvc repro` to produce it")
    return Path(path)


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parses an IDX file (the MNIST format) into a uint8 array, checking magic number and size."""
    if len(data) < 8:
        raise PipelineError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    magic, count = struct.unpack(">II", data[:8])
    if magic == IDX_IMAGES_MAGIC:
        rows, columns = struct.unpack(">II", data[8:16])
        shape, header = (count, rows, columns), 16
    elif magic == IDX_LABELS_MAGIC:
        shape, header = (count,), 8
    else:
        raise PipelineError(
            f"{name}: wrong IDX magic number {magic:#010x}; "
            f"expected {IDX_IMAGES_MAGIC:#010x} (images) or {IDX_LABELS_MAGIC:#010x} (labels)"
        )
    expected_size = header + int(np.prod(shape))
    if len(data) != expected_size:
        raise PipelineError(f"{name}: header says shape {shape} ({expected_size} bytes), file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def save_array(destination: Path, array: np.ndarray) -> None:
    with atomic_path(destination) as temporary:
        np.save(temporary, array, allow_pickle=False)


def load_array(path: Path) -> np.ndarray:
    """Memory-maps a .npy file: no copy until the data is used, and never unpickles."""
    return np.load(require(path), mmap_mode="r", allow_pickle=False)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [0, 1] of shape (n, 28, 28), labels uint8) of a prepared split."""
    return load_array(PREPARED_DIR / f"{split}_images.npy"), load_array(PREPARED_DIR / f"{split}_labels.npy")


def write_csv(destination: Path, table, index: bool = False) -> None:
    """Writes a pandas DataFrame as CSV, atomically."""
    with atomic_path(destination) as temporary:
        table.to_csv(temporary, index=index)


def pyplot():
    """matplotlib's pyplot on the Agg backend: no display needed, figures go to files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, destination: Path) -> None:
    """Saves a matplotlib figure as PNG, atomically, and frees it."""
    plt = pyplot()
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
