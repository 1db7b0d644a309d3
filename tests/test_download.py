"""The downloader: checksums, mirror fallback, and one clear line when every mirror is bad."""

import gzip
import shutil
import sys

import pytest

from pipeline.data_io import IDX_SIZE_AND_SHA256
from pipeline.download import fetch_verified, mirror_list
from pipeline.errors import PipelineError
from tests.helpers import TINY, environment, error_lines, make_project, mnist_source, run, written_files

LABELS = "t10k-labels-idx1-ubyte"  # the smallest file: fast to tamper with


@pytest.fixture(autouse=True)
def only_the_mirrors_given(monkeypatch):
    """MNIST_MIRROR (set by .ci/run) would be tried first: these tests choose their mirrors."""
    mnist_source()  # found (and cached) while MNIST_MIRROR still says where
    monkeypatch.delenv("MNIST_MIRROR", raising=False)


@pytest.fixture
def bad_mirror(tmp_path):
    """A folder whose t10k labels are the real ones with one byte changed."""
    data = bytearray(gzip.decompress((mnist_source() / f"{LABELS}.gz").read_bytes()))
    data[100] ^= 0xFF
    (tmp_path / f"{LABELS}.gz").write_bytes(gzip.compress(bytes(data)))
    return tmp_path


def test_plain_and_gzipped_files_are_both_accepted(tmp_path, serve_directory):
    (tmp_path / LABELS).write_bytes(gzip.decompress((mnist_source() / f"{LABELS}.gz").read_bytes()))
    data = fetch_verified(LABELS, [serve_directory(tmp_path)], timeout_seconds=5)
    assert len(data) == IDX_SIZE_AND_SHA256[LABELS][0]


def test_checksum_mismatch_falls_back_to_the_next_mirror(bad_mirror, mnist_url, capsys):
    data = fetch_verified(LABELS, mirror_list([str(bad_mirror), mnist_url]), timeout_seconds=5)
    assert len(data) == IDX_SIZE_AND_SHA256[LABELS][0]
    assert "checksum mismatch" in capsys.readouterr().err


def test_unreachable_mirror_falls_back(mnist_url):
    closed_port = "http://127.0.0.1:9/"  # discard port: nothing listens there
    assert len(fetch_verified(LABELS, [closed_port, mnist_url], timeout_seconds=5)) == IDX_SIZE_AND_SHA256[LABELS][0]


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"<html><body>404 Not Found</body></html>", "looks like an HTML page"),
        (None, "corrupt or truncated gzip"),  # the real file cut in half
    ],
)
def test_bad_payloads_are_named(tmp_path, payload, reason):
    real = (mnist_source() / f"{LABELS}.gz").read_bytes()
    (tmp_path / f"{LABELS}.gz").write_bytes(payload if payload is not None else real[: len(real) // 2])
    with pytest.raises(PipelineError, match=reason):
        fetch_verified(LABELS, mirror_list([str(tmp_path)]), timeout_seconds=5)


def test_every_mirror_bad_fails_in_one_line_and_writes_nothing(tmp_path, bad_mirror, mnist_url):
    project = make_project(tmp_path / "project", TINY + ["download.mirrors=['http://127.0.0.1:9/']"])
    for name in IDX_SIZE_AND_SHA256:  # a mirror with every file tampered the same way as bad_mirror's labels
        if name != LABELS:
            shutil.copy(mnist_source() / f"{name}.gz", bad_mirror)
    env = environment(str(bad_mirror))
    result = run(project, [sys.executable, "-m", "pipeline.download"], env, check=False)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: download: no mirror served a valid {LABELS}; tried: ")
    assert "checksum mismatch" in line and "127.0.0.1:9" in line and "MNIST_MIRROR" in line
    assert written_files(project / "data") == []
