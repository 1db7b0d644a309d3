"""Configuration: the schema, its composition from conf/, and loading params.yaml for a stage.

conf/ (Hydra) is what people edit. params.yaml is its composition, which DVC tracks and every
stage reads. The schema below holds types and allowed ranges only; the values live in conf/,
so every field is required (MISSING) and nothing is defaulted in two places.

DVC composes conf/ itself only in `dvc exp run`. For `dvc repro`, the `params` stage (this
module's `sync`) depends on conf/ and writes params.yaml: an edit to conf/ recomposes it, with
the overrides the last `make params` recorded in its first line, and the stages it changes rerun.
A params.yaml that is not that composition (edited by hand, written by `dvc exp apply`) stops it.
The `params` stage runs first, and DVC removes a stage's outputs only when it runs that stage
(dvc/stage/__init__.py, Stage.run): a value refused here leaves every output in place.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import runtime
from pipeline.errors import ArgumentParser, PipelineError, guard

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The one command back to the committed configuration (params.yaml, dvc.lock and the outputs): `reset` below.
RESET_HINT = "`make reset` returns the workspace to the committed configuration"
FIX_HINT = (
    "params.yaml is conf/'s composition: put the value in conf/ or an override "
    f'(`make params OVERRIDES="key=value"`, `dvc exp run -S key=value`), or discard it: {RESET_HINT}'
)
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
        _check(self.split_seed >= 0, "data.split_seed", ">= 0", self.split_seed)  # NumPy's generators' seeds


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
MAX_SEED = 2**32 - 1  # keras.utils.set_random_seed's largest (it seeds Python's, NumPy's and TensorFlow's generators)


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
        _check(0 <= self.seed <= MAX_SEED, "train.seed", f"between 0 and {MAX_SEED}", self.seed)
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


def _type_problem(value: Any, annotation: Any) -> str | None:
    """What `value` must be, when its own YAML type is not `annotation` (None when it is)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (annotation,) = [choice for choice in typing.get_args(annotation) if choice is not type(None)]
        problem = _type_problem(value, annotation)
        return f"{problem} or null" if problem else None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, list) and all(_type_problem(element, item) is None for element in value):
            return None
        return f"a list of {'integers' if item is int else 'numbers' if item is float else 'strings'}"
    # bool is an int to Python, and an int is a float to the schema (30 seconds): not the reverse.
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else "a finite number"
        return "a number"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    return None if isinstance(value, annotation) else f"a {annotation.__name__}"


def _check_types(section: str, raw: DictConfig, schema: type) -> None:
    """Strict types before OmegaConf's merge, which converts "0.01" to 0.01 and 5.0 to 5 without a word."""
    if not isinstance(raw, DictConfig):
        raise PipelineError(f"{section} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(schema)
    for name in raw:
        if name in hints and not OmegaConf.is_missing(raw, name):
            value = OmegaConf.to_container(raw, resolve=True)[name]
            problem = _type_problem(value, hints[name])
            if problem:
                raise PipelineError(f"{section}.{name} must be {problem}, got {value!r}")


def validate(raw: DictConfig) -> dict[str, Any]:
    """Checks a whole configuration against the schema; returns {section: dataclass instance}.

    Raises PipelineError naming the offending key and what is allowed. Types are strict: a string
    is not a number, a float not an integer, and inf or nan no number at all.
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
        _check_types(name, raw[name], schema)
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


def read(params_file: Path = PARAMS_FILE) -> DictConfig:
    """params.yaml as written, not yet validated."""
    if not params_file.exists():
        raise PipelineError(f"{params_file} not found; run `make params` to compose it from conf/")
    import yaml

    try:
        return OmegaConf.load(params_file)
    except yaml.YAMLError as error:
        raise PipelineError(f"{params_file} is not valid YAML: {str(error).splitlines()[0]}; {RESET_HINT}") from None


def load(params_file: Path = PARAMS_FILE) -> dict[str, Any]:
    """Reads and validates params.yaml (the composed configuration DVC tracks)."""
    raw = read(params_file)
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
    """Composes conf/ exactly as `dvc exp run` does (dvc.utils.hydra.compose_and_dump), and validates it."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as error:
        raise composition_error(overrides, error) from None
    OmegaConf.resolve(composed)
    try:
        validate(composed)
    except PipelineError as error:
        raise composition_error(overrides, error) from None
    return composed


def composition_error(overrides: list[str], error: Exception) -> PipelineError:
    """The one line for conf/ plus overrides that Hydra or the schema refuses (also hydra_plugins/' in DVC)."""
    import yaml

    # Hydra's list of where it looked for a missing config names its internals, not the user's mistake.
    reason = " ".join(str(error).split()).split(" Config search path:")[0]
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark:  # a file of conf/ that YAML cannot read
        mark = error.problem_mark
        where = os.path.relpath(mark.name) if os.path.isabs(mark.name) else mark.name
        reason = (
            f"{where} is not valid YAML (line {mark.line + 1}, column {mark.column + 1}: {error.problem}); "
            "fix it, or drop your edits with `git checkout conf/`"
        )
    unknown = re.match(r"Could not override '(([^'.]+)\.[^']+)'", reason)
    if unknown and unknown[2] in SECTIONS:  # Hydra's hint (append with +) would fail the schema
        schemas = [SECTIONS[unknown[2]]] if SECTIONS[unknown[2]] else list(MODELS.values())
        allowed = ", ".join(dict.fromkeys(field.name for schema in schemas for field in fields(schema)))
        reason = f"unknown key {unknown[1]!r}; allowed in {unknown[2]}: {allowed}"
    return PipelineError(f"cannot compose conf/ with {' '.join(overrides) or 'no overrides'}: {reason}")


def conf_digest(conf_dir: Path = CONF_DIR) -> str:
    """A hash of every file under conf/: params.yaml's header records the one it was composed from."""
    digest = hashlib.sha256()
    for path in sorted(path for path in Path(conf_dir).rglob("*") if path.is_file()):
        digest.update(path.relative_to(conf_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def write_params(overrides: list[str], conf_dir: Path = CONF_DIR, params_file: Path = PARAMS_FILE) -> DictConfig:
    """`make params`: compose conf/ (plus overrides), validated, and write params.yaml atomically."""
    from pipeline.data_io import atomic_write_text

    composed = compose(overrides, conf_dir)
    header = HEADER.format(digest=conf_digest(conf_dir), overrides=json.dumps(list(overrides)))
    atomic_write_text(params_file, f"{header}\n{OmegaConf.to_yaml(composed)}")
    return composed


def recorded_composition(params_file: Path = PARAMS_FILE) -> tuple[str, list[str]] | None:
    """(conf/ digest, overrides) from params.yaml's header; None without one (`dvc exp apply`, by hand)."""
    first_line = params_file.read_text(encoding="utf-8").partition("\n")[0] if params_file.exists() else ""
    match = HEADER_PATTERN.match(first_line)
    return (match[1], json.loads(match[2])) if match else None


class _Absent:
    """A key one side does not have (None is a value a key can hold)."""

    def __repr__(self) -> str:
        return "(absent)"

    __str__ = __repr__


ABSENT = _Absent()


def changed_values(before: DictConfig | dict, after: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, value before, value after) for each leaf value that differs, in value or in type ("0.01", 0.01)."""

    def leaves(config, prefix=""):
        if isinstance(config, dict):
            return {
                key: value for name, child in config.items() for key, value in leaves(child, f"{prefix}{name}.").items()
            }
        return {prefix.rstrip("."): config}

    old = leaves(OmegaConf.to_container(before) if isinstance(before, DictConfig) else before)
    new = leaves(OmegaConf.to_container(after))
    return [
        (key, old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(set(old) | set(new))
        if type(old.get(key, ABSENT)) is not type(new.get(key, ABSENT)) or old.get(key) != new.get(key)
    ]


def describe_changes(changes: list[tuple[str, Any, Any]], here: str, there: str) -> str:
    """'train.epochs is 1 in params.yaml, 5 from conf/; ...' (a key only one side has is 'absent' on the other)."""

    def shown(value):
        return "absent" if not isinstance(value, (str, int, float, bool, list, type(None))) else repr(value)

    return "; ".join(f"{key} is {shown(old)} {here}, {shown(new)} {there}" for key, old, new in changes)


def sync(conf_dir: Path = CONF_DIR, params_file: Path = PARAMS_FILE) -> None:
    """The `params` stage: params.yaml must be conf/'s composition; recompose it when conf/ changed."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        # `dvc exp run` composed conf/ and its -S overrides into params.yaml itself (or took it as it was):
        # check it here, before a later stage removes its outputs to run.
        try:
            validate(read(params_file))
        except PipelineError as error:
            kept = "no stage after this one ran, every output is in place"
            raise PipelineError(f"{params_file}: {error}; {kept}; {RESET_HINT}") from None
        return
    before = OmegaConf.to_container(read(params_file))
    recorded = recorded_composition(params_file)
    overrides = recorded[1] if recorded else []
    unchanged_conf = recorded is not None and recorded[0] == conf_digest(conf_dir)
    composed = compose(overrides, conf_dir)
    changes = changed_values(before, composed)
    if changes and (unchanged_conf or recorded is None):
        with_overrides = f"conf/ with {' '.join(overrides)}" if overrides else "conf/"
        writers = "`dvc exp run`, `dvc exp apply` or an edit by hand wrote it"
        how = "" if recorded else f" and records no composition ({writers})"
        raise PipelineError(
            f"{params_file} is not the composition of {with_overrides}{how}: "
            f"{describe_changes(changes, 'there', 'in conf/')}. Put the change in conf/ or an override "
            f'(`make params OVERRIDES="key=value ..."`), or discard it: {RESET_HINT}'
        )
    if unchanged_conf:
        return  # params.yaml stands as it was written
    write_params(overrides, conf_dir, params_file)
    with_overrides = f" with {' '.join(overrides)}" if overrides else ""
    described = "; ".join(f"{key}: {old} -> {new}" for key, old, new in changes) or "no value changed"
    print(f"params: conf/ changed; recomposed {params_file}{with_overrides}: {described}", file=sys.stderr)


def reset() -> None:
    """`make reset`: the committed params.yaml, dvc.lock and DVC-tracked outputs back in the workspace.

    conf/ and the code stay as they are (your edits); DVC's experiments stay in their git refs
    (`dvc exp show`, `dvc exp apply`); the tracking store keeps every run.
    """
    from dvc.repo import Repo

    runtime.claim_checkout_to_compose()  # not under a dvc run in progress: it would fail on what changed
    with Repo() as repo:
        # Outputs DVC does not cache (params.yaml, the metrics files) are committed to git instead.
        in_git = sorted({str(out) for stage in repo.index.stages for out in stage.outs if not out.use_cache})
        committed = subprocess.run(["git", "ls-files", "--", "dvc.lock", *in_git], capture_output=True, text=True)
        paths = committed.stdout.split()
        if not paths:
            raise PipelineError("nothing committed to return to: commit params.yaml and dvc.lock first")
        restore = subprocess.run(["git", "checkout", "HEAD", "--", *paths], capture_output=True, text=True)
        if restore.returncode != 0:
            raise PipelineError(f"git checkout HEAD -- {' '.join(paths)}: {restore.stderr.strip()}")
    from dvc.exceptions import CheckoutError

    missing = ""
    with Repo() as repo:  # again: dvc.lock changed under the first one
        try:
            repo.checkout(force=True)
        except CheckoutError as error:  # a fresh clone before `dvc pull`, say: the rest is back
            names = ", ".join(sorted(map(str, error.target_infos)))
            missing = f"; not in DVC's cache: {names} (`dvc pull` fetches them, `dvc repro` recomputes them)"
    print(f"reset: {', '.join(paths)} as committed, and the outputs dvc.lock names from DVC's cache{missing}")


def run_stage(stage: Callable[..., None], *section_names: str) -> None:
    """Entry point of every stage: validate params.yaml, then run the stage under the one error guard."""

    def validated_stage() -> None:
        sections = load()
        stage(*(sections[name] for name in section_names))

    guard(stage.__name__.replace("_", "-"), validated_stage, interrupted=after_an_interrupt(stage.__name__, Path.cwd()))


def after_an_interrupt(stage_name: str, workspace: Path) -> str:
    """What to do after a stage is interrupted: run again, unless it ran in the copy DVC made for a queued
    or --temp experiment (.dvc/tmp/exps/), which goes away with it, checkpoint included."""
    if ".dvc/tmp/exps/" in f"{workspace.as_posix()}/":
        name = os.environ.get("DVC_EXP_NAME") or "the experiment"
        again = "`dvc exp run --queue`; for a sweep's or a study's, `make sweep` or `make tune` again"
        return f"its copy is gone: queue {name} again ({again})"
    if stage_name == "train":
        return "run `dvc repro` again (training resumes from its last completed epoch)"
    return "run `dvc repro` again"


def main() -> None:
    parser = ArgumentParser(command="params", description="Compose conf/ into params.yaml.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sync",
        action="store_true",
        help="the `params` stage: recompose only when conf/ changed since params.yaml was composed",
    )
    mode.add_argument(
        "--reset", action="store_true", help="`make reset`: the committed params.yaml, dvc.lock and outputs back"
    )
    mode.add_argument(
        "--check-free",
        action="store_true",
        help="`make run`, before its `dvc repro`: refused in one line while a dvc run holds this checkout",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=10")
    arguments = parser.parse_args()
    modes = {
        "sync": ("params", sync),
        "reset": ("reset", reset),
        "check_free": ("run", runtime.claim_checkout_to_compose),
    }
    for name, (command, function) in modes.items():
        if getattr(arguments, name):
            if arguments.overrides:
                parser.error("--sync, --reset and --check-free take no overrides")
            guard(command, function)
            return

    def write() -> None:
        runtime.claim_checkout_to_compose()  # not under a dvc run in progress
        write_params(arguments.overrides)
        with_overrides = f" with {' '.join(arguments.overrides)}" if arguments.overrides else ""
        print(f"wrote {PARAMS_FILE} from conf/{with_overrides}")

    guard("params", write)


if __name__ == "__main__":
    main()
