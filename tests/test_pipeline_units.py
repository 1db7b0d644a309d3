"""The stages' and shared modules' decisions, in milliseconds: when params.yaml is recomposed from conf/
(and when that is refused), what Hydra's refusals become, which downloaded bytes are MNIST, which
errors are one line and which keep their traceback, when outputs land, what the evaluation notes."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from tests.helpers import REPO, mnist_source

# params.yaml and conf/.


def test_changed_values_are_the_leaves_that_differ():
    from pipeline.config import ABSENT, changed_values

    before = {"train": {"epochs": 5, "seed": 0}, "model": {"name": "mlp", "filters": [16, 32]}, "old": {"key": 1}}
    after = OmegaConf.create(
        {"train": {"epochs": 7, "seed": 0}, "model": {"name": "mlp", "filters": [16, 64]}, "new": {"key": 2}}
    )
    assert changed_values(before, after) == [
        ("model.filters", [16, 32], [16, 64]),  # a list is one value
        ("new.key", ABSENT, 2),
        ("old.key", 1, ABSENT),
        ("train.epochs", 5, 7),
    ]
    assert changed_values(OmegaConf.create(before), OmegaConf.create(before)) == []


def test_changed_values_between_params_yaml_and_a_composition():
    from pipeline.config import changed_values, compose

    committed = OmegaConf.load(REPO / "params.yaml")
    assert changed_values(committed, compose(["train.epochs=7", "model.hidden_units=64"])) == [
        ("model.hidden_units", 512, 64),
        ("train.epochs", 5, 7),
    ]


@pytest.fixture
def conf(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(a copy of conf/, a params.yaml beside it) outside `dvc exp run`."""
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    return tmp_path / "conf", tmp_path / "params.yaml"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_the_header_records_the_composition(conf):
    from pipeline.config import conf_digest, recorded_composition, write_params

    conf_dir, params = conf
    write_params(["train.epochs=3"], conf_dir, params)
    assert recorded_composition(params) == (conf_digest(conf_dir), ["train.epochs=3"])
    params.write_text(params.read_text().partition("\n")[2])  # as `dvc exp apply` writes it: no header
    assert recorded_composition(params) is None
    assert recorded_composition(params.with_name("absent.yaml")) is None


def test_params_yaml_stands_while_conf_is_unchanged(conf):
    from pipeline.config import sync, write_params

    conf_dir, params = conf
    write_params(["train.epochs=3"], conf_dir, params)
    params.write_text(params.read_text() + "# a note nobody recomposes away\n")
    before = params.read_text()
    sync(conf_dir, params)
    assert params.read_text() == before


def test_an_edit_to_conf_recomposes_params_yaml_with_its_overrides(conf, capsys):
    from pipeline.config import recorded_composition, sync, write_params

    conf_dir, params = conf
    write_params(["train.epochs=3"], conf_dir, params)
    edit(conf_dir / "config.yaml", "batch_size: 1024", "batch_size: 512")
    sync(conf_dir, params)
    recomposed = OmegaConf.load(params)
    assert recomposed.evaluate.batch_size == 512 and recomposed.train.epochs == 3
    assert recorded_composition(params)[1] == ["train.epochs=3"]
    assert "evaluate.batch_size" in capsys.readouterr().err  # what changed is said


def test_params_yaml_of_unknown_origin_that_differs_from_conf_is_not_overwritten(conf):
    from pipeline.config import sync, write_params

    conf_dir, params = conf
    write_params([], conf_dir, params)
    body = params.read_text().partition("\n")[2].replace("epochs: 5", "epochs: 9")  # `dvc exp apply`'s
    params.write_text(body)
    with pytest.raises(PipelineError, match="train.epochs"):
        sync(conf_dir, params)
    assert params.read_text() == body


def test_params_yaml_of_unknown_origin_that_agrees_with_conf_gets_its_header(conf):
    from pipeline.config import recorded_composition, sync, write_params

    conf_dir, params = conf
    write_params([], conf_dir, params)
    params.write_text(params.read_text().partition("\n")[2])
    sync(conf_dir, params)
    assert recorded_composition(params) is not None


def test_dvc_exp_run_composes_params_yaml_itself(conf, monkeypatch):
    from pipeline.config import sync, write_params

    conf_dir, params = conf
    write_params([], conf_dir, params)
    edit(conf_dir / "config.yaml", "batch_size: 1024", "batch_size: 512")
    before = params.read_text()
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    sync(conf_dir, params)
    assert params.read_text() == before


@pytest.mark.parametrize(
    "override, key, allowed",
    [("train.momentum=0.9", "train.momentum", "learning_rate"), ("model.nope=1", "model.nope", "hidden_units")],
)
def test_hydra_refusing_an_unknown_key_becomes_the_allowed_keys(override, key, allowed):
    """Hydra suggests `+key=value`, which the schema would refuse next: the allowed keys are named instead."""
    from pipeline.config import compose

    with pytest.raises(PipelineError) as refused:
        compose([override])
    assert f"'{key}'" in str(refused.value) and allowed in str(refused.value)
    assert f"+{override}" not in str(refused.value)


# The download: only MNIST's own bytes are accepted, whatever a mirror serves.

LABELS = "t10k-labels-idx1-ubyte"  # the smallest file


@pytest.fixture(scope="module")
def real_labels() -> bytes:
    return gzip.decompress((mnist_source() / f"{LABELS}.gz").read_bytes())


@pytest.mark.parametrize("compressed", [True, False], ids=["gzipped", "plain"])
def test_the_real_file_is_accepted_gzipped_or_not(real_labels, compressed):
    from pipeline.download import verify

    payload = gzip.compress(real_labels) if compressed else real_labels
    assert verify(LABELS, payload) == real_labels


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum mismatch"),
        (lambda data: data[:-1], "checksum mismatch"),
        (lambda data: b"<!DOCTYPE html><html><body>Moved</body></html>", "HTML"),
        (lambda data: gzip.compress(data)[:-100], "gzip"),
    ],
    ids=["one-bit", "one-byte-short", "html-page", "truncated-gzip"],
)
def test_anything_else_is_refused(real_labels, tamper, fragment):
    from pipeline.download import verify

    with pytest.raises(PipelineError, match=fragment):
        verify(LABELS, tamper(real_labels))


def test_a_gzip_bomb_is_not_decompressed_past_the_real_size(real_labels):
    from pipeline.data_io import IDX_SIZE_AND_SHA256
    from pipeline.download import verify

    size = IDX_SIZE_AND_SHA256[LABELS][0]
    bomb = gzip.compress(real_labels + bytes(50_000_000), compresslevel=1)  # 50 MB of zeros after the real file
    with pytest.raises(PipelineError, match="checksum mismatch") as refused:
        verify(LABELS, bomb)
    assert f"{size + 1} of {size} bytes" in str(refused.value)  # read one byte past the size, no further


def test_a_download_larger_than_the_real_file_is_cut_off(tmp_path, serve_directory):
    from pipeline.download import read_url

    (tmp_path / "file").write_bytes(bytes(5000))
    url = serve_directory(tmp_path) + "file"
    assert read_url(url, 5, limit=5001) == bytes(5000)
    with pytest.raises(PipelineError, match="larger than the real file"):
        read_url(url, 5, limit=1000)


def test_mirrors_are_urls_with_mnist_mirror_first(tmp_path, monkeypatch):
    from pipeline.download import mirror_list

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", "mnist")  # a folder, relative to where the stage runs
    assert mirror_list(["https://example.org/mnist", "https://example.org/other/"]) == [
        f"{(tmp_path / 'mnist').as_uri()}/",
        "https://example.org/mnist/",
        "https://example.org/other/",
    ]
    monkeypatch.delenv("MNIST_MIRROR")
    assert mirror_list([]) == []


# One line for what the user can fix, a traceback for a bug.


@pytest.fixture
def guarded():
    """guard(), with the signal handlers it installs put back afterwards, and no interrupt remembered."""
    from pipeline import errors

    numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = [signal.getsignal(number) for number in numbers]
    yield errors.guard
    for number, handler in zip(numbers, handlers, strict=True):
        signal.signal(number, handler)
    errors._interrupted.clear()


def raise_(error: BaseException):
    def function():
        raise error

    return function


@pytest.mark.parametrize(
    "error, status",
    [(PipelineError("params.yaml: train.epochs must be >= 1"), 1), (KeyboardInterrupt(), 130)],
    ids=["pipeline-error", "interrupted"],
)
def test_what_the_user_can_fix_is_one_line(guarded, capsys, monkeypatch, error, status):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        guarded("train", raise_(error), interrupted="run `dvc repro` again")
    assert exited.value.code == status
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: train: ")


class DroppingAnInterrupt:
    """Signals its own process from __del__: the KeyboardInterrupt is raised there, and Python drops it."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_whose_interrupt_python_dropped_still_stops_the_command(guarded, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    dropped, finished = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))

    def work():
        DroppingAnInterrupt()  # deleted at once
        finished.append(True)

    with pytest.raises(SystemExit) as exited:
        guarded("train", work, interrupted="run `dvc repro` again")
    assert dropped == [KeyboardInterrupt] and finished  # the work went on
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: train: interrupted; run `dvc repro` again\n"


def test_an_error_raised_while_a_signal_was_handled_is_the_interrupt(guarded, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)

    def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # as C code that ran the handler and went on does
            raise SystemError("bad argument to internal function") from None

    with pytest.raises(SystemExit) as exited:
        guarded("train", work, interrupted="run `dvc repro` again")
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: train: interrupted; run `dvc repro` again\n"


def test_a_filesystem_refusal_is_one_line_naming_the_path(guarded, capsys, tmp_path):
    missing = tmp_path / "data/prepared/train_images.npy"
    with pytest.raises(SystemExit) as exited:
        guarded("train", lambda: missing.read_bytes())
    assert exited.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: train: ") and str(missing) in line


def test_a_bug_keeps_its_traceback(guarded):
    with pytest.raises(ZeroDivisionError):
        guarded("train", lambda: 1 / 0)


def test_pipeline_debug_adds_the_traceback(guarded, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    with pytest.raises(SystemExit):
        guarded("train", raise_(PipelineError("bad")))
    assert "Traceback" in capsys.readouterr().err


def oserror(action) -> OSError:
    with pytest.raises(OSError) as caught:
        action()
    return caught.value


def test_os_errors_are_told_apart(tmp_path):
    from pipeline.errors import describe_os_error

    file = tmp_path / "file"
    file.write_text("")
    missing = tmp_path / "missing"
    lines = {
        "missing": describe_os_error(oserror(lambda: missing.read_text())),  # FileNotFoundError
        "file-as-folder": describe_os_error(oserror(lambda: (file / "below").write_text(""))),  # NotADirectoryError
        "folder-as-file": describe_os_error(oserror(lambda: tmp_path.read_text())),  # IsADirectoryError
        "exists": describe_os_error(oserror(lambda: file.mkdir())),  # FileExistsError
        "other": describe_os_error(oserror(lambda: os.read(-1, 1))),  # EBADF: no path
    }
    assert str(missing) in lines["missing"] and "dvc repro" in lines["missing"]
    for name in ("file-as-folder", "folder-as-file", "exists"):
        assert str(tmp_path) in lines[name], lines[name]
    # Something in the way: one diagnosis, whichever of the three errors says so, and not a missing file's.
    in_the_way = {lines[name].split(" (", 1)[0].split(" ", 1)[1] for name in ("file-as-folder", "folder-as-file")}
    assert len(in_the_way) == 1 and "dvc repro" not in lines["exists"]
    assert os.strerror(9) in lines["other"]


def test_the_file_in_the_way_is_the_one_named(tmp_path, monkeypatch):
    """A file where a folder is needed is named itself, not the path below it that could not be made."""
    from pipeline.errors import describe_os_error

    monkeypatch.chdir(tmp_path)
    Path(".train-checkpoints").write_text("")
    below = oserror(lambda: Path(".train-checkpoints/958547d4/last-epoch.npz").write_text(""))
    assert describe_os_error(below).startswith(".train-checkpoints is in the way (")
    absolute = oserror(lambda: (tmp_path / ".train-checkpoints/958547d4").mkdir(parents=True))
    assert describe_os_error(absolute).startswith(".train-checkpoints is in the way (")


# Outputs land whole or not at all.


def test_staged_outputs_land_only_when_the_block_succeeds(tmp_path, monkeypatch):
    from pipeline.data_io import staged_outputs, write_json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), staged_outputs() as staged:
        write_json(staged / Path("reports/metrics.json"), {"test_accuracy": 0.98})
        raise RuntimeError("the logging failed")
    assert not Path("reports/metrics.json").exists()
    with staged_outputs() as staged:
        write_json(staged / Path("reports/metrics.json"), {"test_accuracy": 0.98})
        assert not Path("reports/metrics.json").exists()  # not before the block ends
    assert json.loads(Path("reports/metrics.json").read_text()) == {"test_accuracy": 0.98}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reports"]  # no scratch left


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    from pipeline.data_io import atomic_path

    model = tmp_path / "models/model.keras"
    model.parent.mkdir()
    model.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(model) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert model.read_text() == "previous" and sorted(model.parent.iterdir()) == [model]


def test_a_missing_upstream_output_names_the_stage_to_run():
    from pipeline.data_io import require

    with pytest.raises(PipelineError, match="dvc repro"):
        require(Path("/nonexistent/data/prepared/manifest.json"))


# evaluate and error-analysis.


def one_hot(predicted: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[predicted] * 0.91 + 0.009


def test_roc_auc_needs_every_digit_among_the_labels():
    from pipeline.evaluate import score

    labels = np.arange(100) % 10
    metrics, _ = score(labels, one_hot(labels))
    assert metrics["test_accuracy"] == 1.0 and metrics["roc_auc_ovr"] == 1.0
    without_nine = labels[labels != 9]
    metrics, _ = score(without_nine, one_hot(without_nine))
    assert metrics["roc_auc_ovr"] is None and metrics["test_accuracy"] == 1.0
    assert all(value is None or isinstance(value, float) for value in metrics.values())  # JSON and MLflow ready


def test_the_most_confused_pairs_come_first():
    from sklearn.metrics import confusion_matrix

    from pipeline.error_analysis import confused_pairs

    labels = np.array([4] * 10 + [7] * 10 + [3] * 10)
    predicted = np.array([9] * 3 + [4] * 7 + [1] * 5 + [7] * 5 + [5] * 1 + [3] * 9)  # 7->1 5x, 4->9 3x, 3->5 1x
    pairs = confused_pairs(confusion_matrix(labels, predicted, labels=range(10)), top=2)
    assert pairs[["true", "predicted", "count"]].values.tolist() == [[7, 1, 5], [4, 9, 3]]
    assert pairs.share_of_true_digit.tolist() == [0.5, 0.3]


@pytest.fixture
def committed_result(tmp_path, monkeypatch):
    """A repository whose HEAD holds params.yaml, reports/metrics.json and reports/numerics.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    for path in ("params.yaml", "reports/metrics.json", "reports/numerics.json"):
        shutil.copy(REPO / path, tmp_path / path)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a result"], check=True)
    return json.loads((tmp_path / "reports/metrics.json").read_text())


def test_evaluate_explains_a_result_that_differs_from_the_commit(committed_result, capsys):
    from pipeline.evaluate import explain_difference_from_commit

    explain_difference_from_commit(committed_result)
    assert capsys.readouterr().err == ""  # the committed result again
    moved = {**committed_result, "test_loss": committed_result["test_loss"] + 1e-6}
    explain_difference_from_commit(moved)
    same_environment = capsys.readouterr().err
    assert "test_loss" in same_environment and "git status" in same_environment  # code, data or packages
    numerics = json.loads(Path("reports/numerics.json").read_text())
    Path("reports/numerics.json").write_text(json.dumps({**numerics, "onednn": "off"}))
    explain_difference_from_commit(moved)
    other_environment = capsys.readouterr().err
    assert "oneDNN" in other_environment and "make reproduce" in other_environment
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("epochs: 5", "epochs: 6"))
    explain_difference_from_commit(moved)
    assert capsys.readouterr().err == ""  # another configuration: nothing to explain


# preprocess: the split.


def raw_arrays(images: int, test: int = 4) -> dict[str, np.ndarray]:
    """Tiny stand-ins for MNIST's four files, keyed as IDX_FILES: each image told apart by its first pixel."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, count in (("train", images), ("test", test)):
        arrays[f"{name}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{name}_images"][:, 0, 0] = np.arange(count)
        arrays[f"{name}_labels"] = (np.arange(count) % 10).astype(np.uint8)
    return arrays


def prepared(split: str) -> np.ndarray:
    return np.load(f"data/prepared/{split}_images.npy")[:, 0, 0] * 255


def test_the_validation_split_is_carved_from_training_by_its_seed(tmp_path, monkeypatch):
    from pipeline.config import DataConfig
    from pipeline.preprocess import prepare

    monkeypatch.chdir(tmp_path)
    raw = raw_arrays(images=40)
    prepare(raw, DataConfig(validation_size=10, split_seed=0, limit=None))
    train, validation = prepared("train"), prepared("validation")
    assert len(validation) == 10 and sorted([*train, *validation]) == list(range(40))  # each image once
    assert prepared("test").tolist() == [0, 1, 2, 3]  # the test set untouched, in order
    prepare(raw, DataConfig(validation_size=10, split_seed=0, limit=None))
    assert prepared("validation").tolist() == validation.tolist()  # the seed decides
    prepare(raw, DataConfig(validation_size=10, split_seed=1, limit=None))
    assert prepared("validation").tolist() != validation.tolist()
    prepare(raw, DataConfig(validation_size=10, split_seed=0, limit=3))
    assert [len(prepared(split)) for split in ("train", "validation", "test")] == [3, 3, 3]
    manifest = json.loads(Path("data/prepared/manifest.json").read_text())
    assert manifest["config"]["limit"] == 3 and manifest["splits"]["test"]["count"] == 3


# What an entry point sets up.


def test_the_callers_environment_wins_over_the_defaults(monkeypatch):
    from pipeline import runtime

    for name in runtime.DEFAULTS:  # set, then removed: monkeypatch puts back whatever was there
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setattr(runtime, "caller_environment", {})
    runtime.apply_defaults()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"  # the caller's
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == runtime.DEFAULTS["MLFLOW_DISABLE_TELEMETRY"]
    # `make reproduce` runs another commit's stages in the environment as the caller gave it.
    assert "MLFLOW_DISABLE_TELEMETRY" not in runtime.caller_environment
    assert runtime.caller_environment["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.parametrize("level, dropped", [("3", True), ("0", False)])
def test_tensorflows_import_notices_are_dropped_unless_asked_for(monkeypatch, capfd, level, dropped):
    from pipeline.runtime import IMPORT_NOTICES, tensorflow_import_notices_hidden

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with tensorflow_import_notices_hidden():
        for line in (*IMPORT_NOTICES, "a warning of the user's own"):
            os.write(2, f"W0000 {line} ...\n".encode())  # as TensorFlow's C++ writes them, past Python
    err = capfd.readouterr().err
    assert "a warning of the user's own" in err
    assert all((notice in err) != dropped for notice in IMPORT_NOTICES)


def test_an_optional_import_is_skipped_only_inside_the_block(tmp_path, monkeypatch):
    """The train stage imports Keras without scikit-learn this way: Keras treats it as not installed."""
    import importlib
    import sys

    from pipeline.runtime import skipped_optional_import

    (tmp_path / "optional_extra.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with skipped_optional_import("optional_extra"):
        with pytest.raises(ImportError):
            importlib.import_module("optional_extra")
    assert "optional_extra" not in sys.modules
    assert importlib.import_module("optional_extra").VALUE == 1  # found again afterwards
    with skipped_optional_import("optional_extra"):  # already imported: left as it is
        assert importlib.import_module("optional_extra").VALUE == 1
    monkeypatch.delitem(sys.modules, "optional_extra")


def test_the_advice_after_an_interrupt_fits_where_the_stage_ran(monkeypatch):
    from pipeline.config import after_an_interrupt

    assert after_an_interrupt("train", Path("/home/me/mnist")) == (
        "run `dvc repro` again (training resumes from its last completed epoch)"
    )
    assert after_an_interrupt("evaluate", Path("/home/me/mnist")) == "run `dvc repro` again"
    monkeypatch.setenv("DVC_EXP_NAME", "lr_x10-seed1")
    assert after_an_interrupt("train", Path("/home/me/mnist/.dvc/tmp/exps/tmpab12cd")).startswith(
        "its copy is gone: queue lr_x10-seed1 again (`dvc exp run --queue`;"
    )


def test_a_mistake_in_a_commands_options_is_one_line(capsys):
    from pipeline.errors import ArgumentParser

    parser = ArgumentParser(prog="model_server.py")
    serve = parser.add_subparsers(dest="command").add_parser("serve")  # a subcommand speaks as itself
    serve.add_argument("--port", type=int)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["serve", "--port", "abc"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: serve: argument --port: invalid int value: 'abc'; `make help` lists the targets and their settings\n"
    )
