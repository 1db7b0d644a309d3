"""Bad input: one clear error line, a non-zero exit, no partial output, the tracking store intact."""

import socket
import struct
import sys
import threading

import pytest

from pipeline.data_io import parse_idx
from pipeline.errors import PipelineError
from tests.helpers import copy_project, environment, error_lines, make_project, run, run_stage_process, written_files


def idx_images(count: int, rows: int = 28, columns: int = 28, magic: int = 0x803) -> bytes:
    return struct.pack(">IIII", magic, count, rows, columns) + bytes(count * rows * columns)


def test_idx_parser_checks_magic_number_and_size():
    assert parse_idx(idx_images(2), "images").shape == (2, 28, 28)
    with pytest.raises(PipelineError, match="wrong IDX magic number 0x00000804"):
        parse_idx(idx_images(2, magic=0x804), "images")
    with pytest.raises(PipelineError, match=r"header says shape \(3, 28, 28\)"):
        parse_idx(idx_images(3)[:-5], "images")
    with pytest.raises(PipelineError, match="too short"):
        parse_idx(b"\x00\x00", "labels")


@pytest.fixture(scope="module")
def prepared_original(tmp_path_factory, mnist_url):
    """A tiny project with download and preprocess done."""
    project = make_project(tmp_path_factory.mktemp("bad-input"))
    env = environment(mnist_url)
    run(project, ["dvc", "repro", "preprocess"], env)
    return project, env


@pytest.fixture
def prepared_project(prepared_original, tmp_path):
    """This test's own copy of the prepared project, to break as it likes."""
    project, env = prepared_original
    return copy_project(project, tmp_path / "project"), env


def test_missing_upstream_output(tmp_path, mnist_url):
    project = make_project(tmp_path)
    before = {path: path.read_bytes() for path in written_files(project)}
    result, _ = run_stage_process(project, environment(mnist_url), "evaluate")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: evaluate: missing upstream output data/prepared/test_images.npy; run `dvc repro` to produce it"
    ]
    assert {path: path.read_bytes() for path in written_files(project) if ".git/" not in str(path)} == {
        path: content for path, content in before.items() if ".git/" not in str(path)
    }


@pytest.mark.slow
def test_corrupted_model_file(prepared_project):
    project, env = prepared_project
    (project / "models").mkdir(exist_ok=True)
    (project / "models/model.keras").write_bytes(b"PK\x03\x04 this is not a keras archive")
    (project / "models/run.json").write_text('{"run_id": "0", "experiment_id": "0"}')
    result, _ = run_stage_process(project, env, "evaluate")
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line == (
        "error: evaluate: models/model.keras is damaged (not a complete Keras archive: File is not a zip file); "
        "restore it with `dvc checkout --force models/model.keras` or rebuild it with `dvc repro --force train`"
    )
    assert not (project / "data/predictions").exists()


@pytest.mark.slow
def test_output_directory_that_cannot_be_written(prepared_project, tmp_path):
    project, env = prepared_project
    blocked = project / "data/predictions"
    blocked.parent.mkdir(exist_ok=True)
    blocked.write_text("a file where the stage needs a directory")
    (project / "models").mkdir(exist_ok=True)
    run(project, [sys.executable, "-m", "pipeline.train"], env)
    result, _ = run_stage_process(project, env, "evaluate")
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith("error: evaluate: data/predictions is in the way (")
    assert "Traceback" not in result.stderr


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["silent", "refused"])
def test_unreachable_tracking_server_fails_fast(prepared_project, silent_server, server):
    project, env = prepared_project
    uri = silent_server if server == "silent" else "http://127.0.0.1:9"
    result, seconds = run_stage_process(project, env, "train", MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: train: MLflow tracking server {uri} does not answer (")
    assert "unset MLFLOW_TRACKING_URI" in line
    assert seconds < 30, f"took {seconds:.0f} s: the tracking check must not hang"
