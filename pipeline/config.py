"""Configuration: the schema, its composition from conf/, and loading params.yaml for a stage.

conf/ (Hydra) is what people edit. params.yaml is its composition, which DVC tracks and every
stage reads. The schema below holds types and allowed ranges only; the values live in conf/,
so every field is required (MISSING) and nothing is defaulted in two places.

DVC composes conf/ itself only in `dvc exp run`. For `dvc repro`, the `params` stage (this
module's `sync`) depends on conf/ and writes params.yaml: an edit to conf/ recomposes it, with
the overrides the last `make params` recorded in its first line, and the stages it changes rerun.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError, guard

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FIX_HINT = "fix it in conf/ and run `dvc repro` (or `dvc exp run -S key=value`)"
# params.yaml's first line: which conf/ it was composed from, and with which overrides.
HEADER = (
    "# Composed from conf/ (edit conf/, not this file; see pipeline/config.py): conf {digest}, overrides {overrides}"
)
HEADER_PATTERN = re.compile(r"^# Composed from conf/ .*: conf ([0-9a-f]{16}), overrides (\[.*\])$")


class ConfigValueError(ValueError):
    """A value outside its allowed range (raised in the schema's __post_init__ checks)."""


def _check(condition: bool, key: str, requirement: str, value: Any) -> None:
    if not condition:
        raise ConfigValueError(f"{key} must be {requirement}, got {value!r}")


@dataclass
class DownloadConfig:
    mirrors: list[str] = MISSING
    timeout_seconds: float = MISSING

    def __post_init__(self) -> None:
        _check(self.timeout_seconds > 0, "download.timeout_seconds", "> 0", self.timeout_seconds)


@dataclass
class DataConfig:
    validation_size: int = MISSING
    split_seed: int = MISSING
    limit: int | None = MISSING

    def __post_init__(self) -> None:
        _check(0 < self.validation_size < 60_000, "data.validation_size", "between 1 and 59999", self.validation_size)
        _check(self.limit is None or self.limit >= 1, "data.limit", "null or >= 1", self.limit)


@dataclass
class MlpConfig:
    name: str = MISSING
    hidden_units: int = MISSING

    def __post_init__(self) -> None:
        _check(self.hidden_units >= 1, "model.hidden_units", ">= 1", self.hidden_units)


@dataclass
class CnnConfig:
    name: str = MISSING
    filters: list[int] = MISSING
    convs_per_block: int = MISSING
    dense_units: int = MISSING
    dropout: float = MISSING
    random_shift: float = MISSING

    def __post_init__(self) -> None:
        # Each block halves the 28-pixel image: a fifth would have nothing left to pool.
        _check(
            1 <= len(self.filters) <= 4 and min(self.filters) >= 1,
            "model.filters",
            "a list of 1 to 4 positive integers (one per block)",
            self.filters,
        )
        _check(self.convs_per_block >= 1, "model.convs_per_block", ">= 1", self.convs_per_block)
        _check(self.dense_units >= 1, "model.dense_units", ">= 1", self.dense_units)
        _check(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)
        _check(0 <= self.random_shift < 0.5, "model.random_shift", "in [0, 0.5)", self.random_shift)


MODELS = {"mlp": MlpConfig, "cnn": CnnConfig}
# The presets in conf/experiment/, in the comparison table's order; the first four are the article's.
# tuned.yaml exists once `make tune` has written its best setting.
SETTINGS = ["default", "lr_x10", "batch_x10", "epochs_x10", "tuned", "cnn"]
TUNED_PRESET = CONF_DIR / "experiment" / "tuned.yaml"
DISTRIBUTIONS = ("single", "mirrored")
SCHEDULES = ("constant", "warmup_cosine")


@dataclass
class TrainConfig:
    learning_rate: float = MISSING
    batch_size: int = MISSING
    epochs: int = MISSING
    schedule: str = MISSING
    seed: int = MISSING
    steps_per_execution: int = MISSING
    mixed_precision: bool = MISSING
    distribution: str = MISSING
    replicas: int | None = MISSING

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        _check(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        _check(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _check(self.schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        _check(self.steps_per_execution >= 1, "train.steps_per_execution", ">= 1", self.steps_per_execution)
        _check(
            self.distribution in DISTRIBUTIONS,
            "train.distribution",
            f"one of {', '.join(DISTRIBUTIONS)}",
            self.distribution,
        )
        _check(
            self.replicas is None or (self.replicas >= 1 and self.distribution == "mirrored"),
            "train.replicas",
            "null, or >= 1 with train.distribution=mirrored",
            self.replicas,
        )
        # Keras 3 fails to run several steps per call under MirroredStrategy (keras-team/keras#19246).
        _check(
            self.steps_per_execution == 1 or self.distribution != "mirrored",
            "train.steps_per_execution",
            "1 with train.distribution=mirrored (keras-team/keras#19246)",
            self.steps_per_execution,
        )


@dataclass
class EvaluateConfig:
    batch_size: int = MISSING

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", ">= 1", self.batch_size)


@dataclass
class ErrorAnalysisConfig:
    gallery_size: int = MISSING
    top_confused_pairs: int = MISSING

    def __post_init__(self) -> None:
        _check(self.gallery_size >= 1, "error_analysis.gallery_size", ">= 1", self.gallery_size)
        _check(self.top_confused_pairs >= 1, "error_analysis.top_confused_pairs", ">= 1", self.top_confused_pairs)


SECTIONS = {
    "download": DownloadConfig,
    "data": DataConfig,
    "model": None,  # MlpConfig or CnnConfig, chosen by model.name
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "error_analysis": ErrorAnalysisConfig,
}


def validate(raw: DictConfig) -> dict[str, Any]:
    """Checks a whole configuration against the schema; returns {section: dataclass instance}.

    Raises PipelineError naming the offending key and what is allowed.
    """
    unknown = sorted(set(raw.keys()) - set(SECTIONS))
    if unknown:
        raise PipelineError(f"unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    missing = [name for name in SECTIONS if name not in raw]
    if missing:
        raise PipelineError(f"missing section {missing[0]!r}")
    model_name = raw.model.get("name") if isinstance(raw.model, DictConfig) else None
    if model_name not in MODELS:
        raise PipelineError(f"model.name: unknown model {model_name!r}; allowed: {', '.join(MODELS)}")

    sections = {}
    for name, schema in SECTIONS.items():
        schema = schema or MODELS[model_name]
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), raw[name])
            sections[name] = OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:
            raise PipelineError(_describe(error, name, schema)) from None
        except ConfigValueError as error:  # a range check in __post_init__
            raise PipelineError(str(error)) from None
    return sections


def _describe(error: OmegaConfBaseException, section: str, schema: type) -> str:
    key = f"{section}.{error.full_key}" if getattr(error, "full_key", None) else section
    message = str(error).splitlines()[0]
    if "not in" in message:  # omegaconf's wording for an unknown key
        allowed = ", ".join(field.name for field in fields(schema))
        return f"unknown key {key!r}; allowed in {section}: {allowed}"
    if "missing mandatory value" in message.lower():
        missing = message.rsplit(":", 1)[-1].strip() if message.startswith("Structured") else error.full_key
        return f"missing key '{section}.{missing}'"
    return f"{key}: {message}"


def load(params_file: Path = PARAMS_FILE) -> dict[str, Any]:
    """Reads and validates params.yaml (the composed configuration DVC tracks)."""
    if not params_file.exists():
        raise PipelineError(f"{params_file} not found; run `make params` to compose it from conf/")
    import yaml

    try:
        raw = OmegaConf.load(params_file)
    except yaml.YAMLError as error:
        raise PipelineError(f"{params_file} is not valid YAML: {str(error).splitlines()[0]}") from None
    try:
        return validate(raw)
    except PipelineError as error:
        raise PipelineError(f"{params_file}: {error}; {FIX_HINT}") from None


def flatten(sections: dict[str, Any]) -> dict[str, Any]:
    """{'train.learning_rate': 0.001, ...}: the resolved values as MLflow params."""
    flat = {}
    for name, section in sections.items():
        for key, value in OmegaConf.to_container(OmegaConf.structured(section)).items():
            flat[f"{name}.{key}"] = value
    return flat


def config_hash(params: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A short, stable hash of flattened params: equal hashes mean the same configuration."""
    kept = {key: value for key, value in params.items() if key not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def training_params(sections: dict[str, Any]) -> dict[str, Any]:
    """What decides a trained model: the data, model and train sections, flattened."""
    return flatten({name: sections[name] for name in ("data", "model", "train")})


def training_hash(overrides: list[str], without_seed: bool = False) -> str:
    """The `config.hash` (or `config.hash_without_seed`) tag a training of conf/ plus overrides gets."""
    return config_hash(training_params(validate(compose(overrides))), ignore=("train.seed",) if without_seed else ())


def compose(overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Composes conf/ exactly as `dvc exp run` does (dvc.utils.hydra.compose_and_dump)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        reason = " ".join(str(error).split())
        unknown = re.match(r"Could not override '(([^'.]+)\.[^']+)'", reason)
        if unknown and unknown[2] in SECTIONS:  # Hydra's hint (append with +) would fail the schema
            schemas = [SECTIONS[unknown[2]]] if SECTIONS[unknown[2]] else list(MODELS.values())
            allowed = ", ".join(dict.fromkeys(field.name for schema in schemas for field in fields(schema)))
            reason = f"unknown key {unknown[1]!r}; allowed in {unknown[2]}: {allowed}"
        raise PipelineError(f"cannot compose conf/ with {' '.join(overrides) or 'no overrides'}: {reason}") from None
    OmegaConf.resolve(composed)
    return composed


def conf_digest(conf_dir: Path = CONF_DIR) -> str:
    """A hash of every file under conf/: params.yaml's header records the one it was composed from."""
    digest = hashlib.sha256()
    for path in sorted(path for path in Path(conf_dir).rglob("*") if path.is_file()):
        digest.update(path.relative_to(conf_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def write_params(overrides: list[str], conf_dir: Path = CONF_DIR, params_file: Path = PARAMS_FILE) -> DictConfig:
    """`make params`: compose conf/ (plus overrides), validate, and write params.yaml atomically."""
    from pipeline.data_io import atomic_write_text

    composed = compose(overrides, conf_dir)
    validate(composed)
    header = HEADER.format(digest=conf_digest(conf_dir), overrides=json.dumps(list(overrides)))
    atomic_write_text(params_file, f"{header}\n{OmegaConf.to_yaml(composed)}")
    return composed


def recorded_composition(params_file: Path = PARAMS_FILE) -> tuple[str, list[str]] | None:
    """(conf/ digest, overrides) from params.yaml's header; None without one (`dvc exp apply`, by hand)."""
    first_line = params_file.read_text(encoding="utf-8").partition("\n")[0] if params_file.exists() else ""
    match = HEADER_PATTERN.match(first_line)
    return (match[1], json.loads(match[2])) if match else None


def changed_values(before: DictConfig | dict, after: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, value before, value after) for each leaf value that differs."""

    def leaves(config, prefix=""):
        if isinstance(config, dict):
            return {
                key: value for name, child in config.items() for key, value in leaves(child, f"{prefix}{name}.").items()
            }
        return {prefix.rstrip("."): config}

    old = leaves(OmegaConf.to_container(before) if isinstance(before, DictConfig) else before)
    new = leaves(OmegaConf.to_container(after))
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def sync(conf_dir: Path = CONF_DIR, params_file: Path = PARAMS_FILE) -> None:
    """The `params` stage: recompose params.yaml when conf/ changed since it was composed."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return  # `dvc exp run` composed conf/ and its -S overrides into params.yaml itself
    recorded = recorded_composition(params_file)
    if recorded and recorded[0] == conf_digest(conf_dir):
        return  # conf/ unchanged: params.yaml stands as it was written
    overrides = recorded[1] if recorded else []
    before = OmegaConf.load(params_file) if params_file.exists() else {}
    composed = compose(overrides, conf_dir)
    changes = changed_values(before, composed)
    if recorded is None and changes:
        differing = "; ".join(f"{key} is {old} there, {new} in conf/" for key, old, new in changes)
        raise PipelineError(
            f"{params_file} differs from conf/ ({differing}) and does not record how it was composed "
            "(`dvc exp apply` or an edit by hand wrote it); run `make params` to take conf/, or "
            '`make params OVERRIDES="key=value ..."` to keep other values'
        )
    write_params(overrides, conf_dir, params_file)
    with_overrides = f" with {' '.join(overrides)}" if overrides else ""
    described = "; ".join(f"{key}: {old} -> {new}" for key, old, new in changes) or "no value changed"
    print(f"params: conf/ changed; recomposed {params_file}{with_overrides}: {described}", file=sys.stderr)


def run_stage(stage: Callable[..., None], *section_names: str) -> None:
    """Entry point of every stage: validate params.yaml, then run the stage under the one error guard."""

    def validated_stage() -> None:
        sections = load()
        stage(*(sections[name] for name in section_names))

    interrupted = (
        "run `dvc repro` again (training resumes from its last completed epoch)"
        if stage.__name__ == "train"
        else "run `dvc repro` again"
    )
    guard(stage.__name__.replace("_", "-"), validated_stage, interrupted=interrupted)


def main() -> None:
    parser = argparse.ArgumentParser(description="Compose conf/ into params.yaml.")
    parser.add_argument(
        "--sync",
        action="store_true",
        help="the `params` stage: recompose only when conf/ changed since params.yaml was composed",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=10")
    arguments = parser.parse_args()
    if arguments.sync:
        guard("params", sync)
        return

    def write() -> None:
        write_params(arguments.overrides)
        with_overrides = f" with {' '.join(arguments.overrides)}" if arguments.overrides else ""
        print(f"wrote {PARAMS_FILE} from conf/{with_overrides}")

    guard("params", write)


if __name__ == "__main__":
    main()
