"""Configuration: params.yaml is conf/'s composition, and every bad value is refused up front."""

import os
import re
import shutil
import sys

import pytest
from omegaconf import OmegaConf

from pipeline.config import SETTINGS, compose, validate
from pipeline.errors import PipelineError
from tests.helpers import REPO, error_lines, make_project, run, written_files


def test_params_yaml_is_the_composition_of_conf():
    committed = OmegaConf.load(REPO / "params.yaml")
    assert OmegaConf.to_container(committed) == OmegaConf.to_container(compose()), (
        "params.yaml is stale: run `make params` and commit it"
    )


def test_default_config_is_the_reference_model():
    sections = validate(compose())
    assert sections["model"].name == "mlp" and sections["model"].hidden_units == 512
    train = sections["train"]
    assert (train.learning_rate, train.batch_size, train.epochs) == (0.001, 64, 5)


@pytest.mark.parametrize("preset", sorted(path.stem for path in (REPO / "conf/experiment").glob("*.yaml")))
def test_every_preset_composes_and_is_a_setting(preset):
    sections = validate(compose([f"+experiment={preset}"]))
    assert sections["model"].name in ("mlp", "cnn")
    assert preset in SETTINGS, f"conf/experiment/{preset}.yaml is not in pipeline.config.SETTINGS"


def test_model_group_switches_the_model():
    assert validate(compose(["model=cnn"]))["model"].name == "cnn"


@pytest.mark.parametrize(
    "override, message",
    [
        ("+train.momentum=0.9", "unknown key 'train.momentum'"),
        ("+extra.thing=1", "unknown section 'extra'"),
        ("train.batch_size=sixty-four", "train.batch_size"),
        ("train.learning_rate=0", "train.learning_rate must be > 0, got 0"),
        ("train.learning_rate=-0.1", "train.learning_rate must be > 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("model.name=resnet", "model.name: unknown model 'resnet'; allowed: mlp, cnn"),
        ("data.limit=0", "data.limit must be null or >= 1"),
        ("train.distribution=horovod", "train.distribution must be one of single, mirrored, got 'horovod'"),
        ("train.schedule=one_cycle", "train.schedule must be one of constant, warmup_cosine, got 'one_cycle'"),
        ("model=cnn model.filters=[8,8,8,8,8]", "model.filters must be a list of 1 to 4 positive integers"),
        ("model=cnn model.random_shift=0.5", "model.random_shift must be in [0, 0.5), got 0.5"),
        ("train.distribution=mirrored", "train.steps_per_execution must be 1 with train.distribution=mirrored"),
        ("train.replicas=2", "train.replicas must be null, or >= 1 with train.distribution=mirrored, got 2"),
        ("~train.epochs", "missing key 'train.epochs'"),
        # Strict types: OmegaConf alone would turn "0.01" into 0.01 and 5.0 into 5 without a word.
        ('train.learning_rate="0.01"', "train.learning_rate must be a number, got '0.01'"),
        ("train.epochs=5.0", "train.epochs must be an integer, got 5.0"),
        ("train.learning_rate=inf", "train.learning_rate must be a finite number, got inf"),
        ("train.learning_rate=nan", "train.learning_rate must be a finite number, got nan"),
        ("download.timeout_seconds=-inf", "download.timeout_seconds must be a finite number, got -inf"),
        ("train.mixed_precision=1", "train.mixed_precision must be true or false, got 1"),
        ("train.batch_size=true", "train.batch_size must be an integer, got True"),
        ("data.limit=2.5", "data.limit must be an integer or null, got 2.5"),
        ("model=cnn model.filters=[16,32.5]", "model.filters must be a list of integers, got [16, 32.5]"),
        ("train.epoch=3", "unknown key 'train.epoch'; allowed in train: learning_rate, batch_size, epochs,"),
        ("train.seed=-1", "train.seed must be between 0 and 4294967295, got -1"),
        ("train.seed=4294967296", "train.seed must be between 0 and 4294967295, got 4294967296"),
        ("data.split_seed=-1", "data.split_seed must be >= 0, got -1"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        validate(compose(override.split()))


def test_a_file_of_conf_that_is_not_yaml_is_named_with_its_line(tmp_path):
    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text() + "train: [oops\n")
    with pytest.raises(PipelineError) as raised:
        compose(conf_dir=conf)
    lines = (conf / "config.yaml").read_text().count("\n")
    assert str(raised.value) == (
        f"cannot compose conf/ with no overrides: {os.path.relpath(conf / 'config.yaml')} is not valid YAML "
        f"(line {lines + 1}, column 1: expected ',' or ']', but got '<stream end>'); fix it, or drop your edits "
        "with `git checkout conf/`"
    )


def test_ints_stand_for_floats_and_null_for_optional_values():
    sections = validate(compose(["download.timeout_seconds=30", "train.learning_rate=1", "data.limit=null"]))
    assert sections["download"].timeout_seconds == 30 and sections["data"].limit is None


def test_stage_refuses_bad_params_in_one_line_before_any_work(tmp_path, mnist_url):
    from tests.helpers import environment

    project = make_project(tmp_path)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.001", "learning_rate: -1"))
    result = run(project, [sys.executable, "-m", "pipeline.train"], environment(mnist_url), check=False)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: train: params.yaml: train.learning_rate must be > 0, got -1.0; params.yaml is conf/'s composition: "
        'put the value in conf/ or an override (`make params OVERRIDES="key=value"`, `dvc exp run -S key=value`), '
        "or discard it: `make reset` returns the workspace to the committed configuration"
    ]
    assert "Traceback" not in result.stderr
    assert written_files(project / "models") == [] and not (project / "mlflow.db").exists()
