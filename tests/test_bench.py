"""`make bench` and `make numerics` run for half an hour and more: what breaks them at start must fail here."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize("script", ["bench", "numeric_environments"])
def test_the_bench_scripts_import(script):
    """A helper renamed in one script and not in the other fails here in seconds, not after an hour."""
    result = subprocess.run(
        [sys.executable, "-c", f"import {script}"], cwd=REPO / "bench", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
