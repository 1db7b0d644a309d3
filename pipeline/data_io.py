"""The pipeline's files: where they live, IDX parsing, arrays without pickle, atomic writes.

Every output is written to a temporary name beside its destination and renamed into place,
so a failed or killed stage never leaves a half-written file that looks complete. The stages that
log to MLflow stage all their outputs (staged_outputs) and land them only after the logging
succeeded: files, dvc.lock and the tracking store never disagree after a failure. An error about a
temporary names the destination: the user's path, not ours.

Every file a stage reads from an earlier stage is checked before use (load_idx, load_array, load_split,
read_json, load_model): a damaged one is one line naming it and the command that restores or rebuilds it.
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, raise_if_interrupted

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
# Decompressed size and SHA-256 of each file, as every MNIST mirror serves it: download checks what it
# fetches, preprocess what it reads. The sizes follow from the IDX format: a 16-byte header and 28x28
# bytes per image, or an 8-byte header and a byte per label.
IDX_SIZE_AND_SHA256 = {
    "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
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
        with errors_naming(temporary, destination):
            yield temporary
            os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def errors_naming(temporary: Path, destination: Path) -> Iterator[None]:
    """Re-raises an OSError about `temporary` (or a path under it) as one about `destination`."""
    try:
        yield
    except OSError as error:
        named = error.filename and Path(error.filename)
        if named and (named == temporary or temporary in named.parents):
            raise type(error)(error.errno, error.strerror, str(destination / named.relative_to(temporary))) from None
        raise


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
        with errors_naming(root, Path()):
            yield StagedOutputs(root)
            raise_if_interrupted()
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
    try:
        return json.loads(require(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, f"not valid JSON: {error}") from None


def read_manifest() -> dict[str, Any]:
    """data/prepared/manifest.json, as preprocess wrote it: its config, data_hash and splits."""
    manifest = read_json(MANIFEST_FILE)
    expected = {"config": dict, "data_hash": str, "splits": dict}
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(key), kind) for key, kind in expected.items()):
        raise damaged(MANIFEST_FILE, "not preprocess's manifest: it needs config, data_hash and splits")
    return manifest


def read_run_id() -> str:
    """The MLflow run id that train recorded in models/run.json."""
    content = read_json(RUN_FILE)
    run_id = content.get("run_id") if isinstance(content, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise damaged(RUN_FILE, 'no MLflow run id under "run_id"')
    return run_id


def damaged(path: Path, reason: str) -> PipelineError:
    """The error for a damaged upstream output: what is wrong, and how to get it back."""
    return PipelineError(f"{path} is damaged ({reason}); {restore_hint(path)}")


def restore_hint(path: Path) -> str:
    """How to get an upstream output back: from DVC's cache, or by running the stage that writes it
    (found in dvc.yaml, which declares every output)."""
    import yaml

    path = Path(path)
    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        stages = {}
    for stage, definition in stages.items():
        for output in definition.get("outs", []):
            output = Path(next(iter(output)) if isinstance(output, dict) else output)
            if path == output or output in path.parents:
                return f"restore it with `dvc checkout --force {output}` or rebuild it with `dvc repro --force {stage}`"
    return "run `dvc repro` to rebuild it"


def require(path: Path) -> Path:
    """Fails with the fix when an upstream output is missing."""
    if not Path(path).exists():
        raise PipelineError(f"missing upstream output {path}; run `dvc repro` to produce it")
    return Path(path)


def load_idx(name: str) -> np.ndarray:
    """A downloaded MNIST file of data/raw as a uint8 array, checked against MNIST's size and SHA-256
    first: a file truncated or changed since download would otherwise be split and trained on."""
    path = RAW_DIR / name
    data = require(path).read_bytes()
    expected_size, expected_sha256 = IDX_SIZE_AND_SHA256[name]
    if len(data) != expected_size:
        raise damaged(path, f"{len(data)} bytes, MNIST's file has {expected_size}")
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise damaged(path, "its content does not match MNIST's SHA-256")
    return parse_idx(data, name)


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


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_array(path: Path, dtype: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """Memory-maps a .npy file: no copy until the data is used, and never unpickles.

    Its header is checked first (dtype, shape, None for any length) and its size against the header:
    a truncated or foreign file is one line (damaged), not numpy's mmap error or a wrong array.
    """
    with open(require(path), "rb") as file:
        try:
            read_header = NPY_HEADER_READERS.get(np.lib.format.read_magic(file))
            if read_header is None:
                raise ValueError("a .npy format version np.save does not write here")
            found_shape, fortran_order, found_dtype = read_header(file)
        except ValueError as error:
            raise damaged(path, f"not a NumPy array file: {error}") from None
        data_offset = file.tell()
    if found_dtype != np.dtype(dtype) or fortran_order:
        raise damaged(path, f"holds {found_dtype} values, expected {np.dtype(dtype)}")
    lengths_differ = len(found_shape) != len(shape)
    if lengths_differ or any(want not in (None, got) for want, got in zip(shape, found_shape, strict=True)):
        expected = "(" + ", ".join("n" if length is None else str(length) for length in shape) + ")"
        raise damaged(path, f"shape {found_shape}, expected {expected}")
    expected_size = data_offset + int(np.prod(found_shape)) * found_dtype.itemsize
    if (size := Path(path).stat().st_size) != expected_size:
        raise damaged(path, f"{size} bytes where its header needs {expected_size}: truncated or overwritten")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [0, 1] of shape (n, 28, 28), labels uint8) of a prepared split, as preprocess wrote it.

    Size, dtype and shape are checked against the files' headers and the manifest's count, and the
    content against the manifest's SHA-256: a file changed in place (same size) would otherwise train
    or score silently, under a dataset digest that no longer describes it.
    """
    images = load_array(PREPARED_DIR / f"{split}_images.npy", "float32", (None, *IMAGE_SHAPE))
    labels = load_array(PREPARED_DIR / f"{split}_labels.npy", "uint8", (len(images),))
    try:
        expected = read_manifest()["splits"][split]
        count, sha256 = int(expected["count"]), str(expected["sha256"])
    except (KeyError, TypeError, ValueError) as error:
        raise damaged(MANIFEST_FILE, f"no count and sha256 of the {split} split ({error!r})") from None
    if len(images) != count:
        raise damaged(PREPARED_DIR / f"{split}_images.npy", f"{len(images)} images, {MANIFEST_FILE} says {count}")
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(array)  # the memory map's own buffer: no copy
    if digest.hexdigest() != sha256:
        raise damaged(
            PREPARED_DIR / f"{split}_images.npy",
            f"with {split}_labels.npy, its content does not match the SHA-256 in {MANIFEST_FILE}",
        )
    return images, labels


def load_model(path: Path = MODEL_FILE, **options: Any):
    """A trained Keras model, in safe mode (no arbitrary code), checked as a complete archive first:
    Keras reports a truncated .keras file as "File not found"."""
    try:
        with zipfile.ZipFile(require(path)) as archive:
            broken = archive.testzip()  # the CRC of every member
    except (zipfile.BadZipFile, EOFError) as error:
        raise damaged(path, f"not a complete Keras archive: {error}") from None
    if broken is not None:
        raise damaged(path, f"its member {broken} fails its checksum")
    import keras

    try:
        return keras.models.load_model(path, safe_mode=True, **options)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise damaged(path, f"Keras cannot load it: {str(error).splitlines()[0] if str(error) else error!r}") from None


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
