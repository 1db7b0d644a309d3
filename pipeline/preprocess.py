"""Stage 2, preprocess: IDX files -> float32 arrays in [0, 1], with a seeded validation split.

The validation split is carved out of the 60,000 training images; the official 10,000-image
test set is kept whole and untouched, so test accuracy stays comparable with published figures.
"""

import dataclasses
import hashlib
import sys

import numpy as np

from pipeline.config import DataConfig, run_stage
from pipeline.data_io import (
    IDX_FILES,
    MANIFEST_FILE,
    NUM_CLASSES,
    PREPARED_DIR,
    SPLITS,
    load_idx,
    save_array,
    write_json,
)


def preprocess(config: DataConfig) -> None:
    prepare({key: load_idx(name) for key, name in IDX_FILES.items()}, config)


def prepare(raw: dict[str, np.ndarray], config: DataConfig) -> None:
    """Splits the raw arrays (keyed as IDX_FILES) and writes data/prepared with its manifest."""
    order = np.random.default_rng(config.split_seed).permutation(raw["train_images"].shape[0])
    validation_indices, train_indices = order[: config.validation_size], order[config.validation_size :]
    splits = {
        "train": (raw["train_images"][train_indices], raw["train_labels"][train_indices]),
        "validation": (raw["train_images"][validation_indices], raw["train_labels"][validation_indices]),
        "test": (raw["test_images"], raw["test_labels"]),
    }

    digest = hashlib.sha256()
    manifest = {"config": dataclasses.asdict(config), "splits": {}}
    for split in SPLITS:
        images, labels = (array[: config.limit] for array in splits[split])
        images = images.astype(np.float32)
        images /= np.float32(255.0)  # in place: one float32 copy of the split in memory, not two
        save_array(PREPARED_DIR / f"{split}_images.npy", images)
        save_array(PREPARED_DIR / f"{split}_labels.npy", labels)
        split_digest = hashlib.sha256()
        for array in (images, labels):
            digest.update(array)  # hashlib reads the arrays' own buffers: no bytes copies
            split_digest.update(array)
        manifest["splits"][split] = {
            "count": int(len(labels)),
            "label_counts": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
            "sha256": split_digest.hexdigest(),
        }  # the split's MLflow dataset digest
    # One hash of everything the model sees: MLflow runs carry it as lineage.
    manifest["data_hash"] = digest.hexdigest()
    write_json(MANIFEST_FILE, manifest)
    counts = ", ".join(f"{split} {manifest['splits'][split]['count']}" for split in SPLITS)
    print(f"preprocess: {counts}; data hash {manifest['data_hash'][:12]}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(preprocess, "data")
