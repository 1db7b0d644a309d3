"""Configuration: the schema, its composition from conf/, and loading params.yaml for a stage.

conf/ (Hydra) is what people edit. params.yaml is its composition, which DVC tracks and every
stage reads. The schema below holds types and allowed ranges only; the values live in conf/,
so every field is required (MISSING) and nothing is defaulted in two places.
"""

import hashlib
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FIX_HINT = "fix it in conf/ and run `make params` (or `dvc exp run -S key=value`)"


class PipelineError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


def _check(condition: bool, key: str, requirement: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{key} must be {requirement}, got {value!r}")


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
    limit: Optional[int] = MISSING

    def __post_init__(self) -> None:
        _check(0 < self.validation_size < 60_000, "data.validation_size", "between 1 and 59999",
               self.validation_size)
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
    dense_units: int = MISSING
    dropout: float = MISSING

    def __post_init__(self) -> None:
        _check(len(self.filters) >= 1 and min(self.filters) >= 1, "model.filters",
               "a non-empty list of positive integers", self.filters)
        _check(self.dense_units >= 1, "model.dense_units", ">= 1", self.dense_units)
        _check(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)


MODELS = {"mlp": MlpConfig, "cnn": CnnConfig}
DISTRIBUTIONS = ("single", "mirrored")


@dataclass
class TrainConfig:
    learning_rate: float = MISSING
    batch_size: int = MISSING
    epochs: int = MISSING
    seed: int = MISSING
    steps_per_execution: int = MISSING
    jit_compile: bool = MISSING
    mixed_precision: bool = MISSING
    distribution: str = MISSING
    replicas: Optional[int] = MISSING

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        _check(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        _check(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _check(self.steps_per_execution >= 1, "train.steps_per_execution", ">= 1",
               self.steps_per_execution)
        _check(self.distribution in DISTRIBUTIONS, "train.distribution", f"one of {', '.join(DISTRIBUTIONS)}",
               self.distribution)
        _check(self.replicas is None or (self.replicas >= 1 and self.distribution == "mirrored"),
               "train.replicas", "null, or >= 1 with train.distribution=mirrored", self.replicas)
        # Keras 3 fails to run several steps per call under MirroredStrategy (keras-team/keras#19246).
        _check(self.steps_per_execution == 1 or self.distribution != "mirrored", "train.steps_per_execution",
               "1 with train.distribution=mirrored (keras-team/keras#19246)", self.steps_per_execution)


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
        _check(self.top_confused_pairs >= 1, "error_analysis.top_confused_pairs", ">= 1",
               self.top_confused_pairs)


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
        except ValueError as error:  # a range check in __post_init__
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
    try:
        raw = OmegaConf.load(params_file)
    except Exception as error:  # a YAML syntax error
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


def compose(overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Composes conf/ exactly as `dvc exp run` does (dvc.utils.hydra.compose_and_dump)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        composed = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(composed)
    return composed


def run_stage(stage: Callable[..., None], *section_names: str) -> None:
    """Entry point of every stage: validate params.yaml, run, and report failures in one line.

    PIPELINE_DEBUG=1 adds the traceback.
    """
    # SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C: open MLflow runs get closed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sections = load()
        stage(*(sections[name] for name in section_names))
    except (PipelineError, ValueError) as error:
        fail(stage.__name__, str(error))
    except OSError as error:  # the filesystem refused: name the path
        path = error.filename or ""
        fail(stage.__name__, f"cannot write {path} ({error.strerror or error}); "
                             "check that its folder exists, is a folder and is writable")
    except KeyboardInterrupt:
        fail(stage.__name__, "interrupted; run `dvc repro` again to finish (training resumes from its last completed epoch)", exit_code=130)


def fail(stage_name: str, message: str, exit_code: int = 1) -> None:
    if os.environ.get("PIPELINE_DEBUG"):
        traceback.print_exc()
    print(f"error: {stage_name}: {message}", file=sys.stderr)
    sys.exit(exit_code)


def write_params(overrides: list[str]) -> None:
    """`make params`: compose conf/ (plus overrides), validate, and write params.yaml atomically."""
    from pipeline.data_io import atomic_write_text

    composed = compose(overrides)
    validate(composed)
    atomic_write_text(PARAMS_FILE, OmegaConf.to_yaml(composed))
    print(f"wrote {PARAMS_FILE} from conf/" + (f" with {' '.join(overrides)}" if overrides else ""))


if __name__ == "__main__":
    try:
        write_params(sys.argv[1:])
    except PipelineError as error:
        print(f"error: conf/: {error}", file=sys.stderr)
        sys.exit(1)
