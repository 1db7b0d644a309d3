"""The GPU path of the install: what can be checked without a GPU. (No test here runs TensorFlow on one.)"""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, run

NVIDIA_SMI = "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n"


def lock_make_would_install(tmp_path, nvidia_smi: str | None, *variables: str) -> str:
    """The lock `make` installs .venv from, as its dry run (-n) prints it, with a stand-in nvidia-smi."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    if nvidia_smi:
        (tools / "nvidia-smi").write_text(nvidia_smi)
        (tools / "nvidia-smi").chmod(0o755)
    # -W: as if requirements.lock had changed, so that the install recipe is printed; -n runs nothing.
    result = run(
        REPO,
        ["make", "-n", "-W", "requirements.lock", ".venv/.installed", *variables],
        {"PATH": f"{tools}:/usr/bin:/bin"},
    )
    [install] = [line for line in result.stdout.splitlines() if "pip install --quiet -r" in line]
    return install.split(" -r ")[1]


@pytest.mark.parametrize(
    "nvidia_smi, variables, lock",
    [
        (NVIDIA_SMI, [], "requirements-gpu.lock"),  # a GPU is listed
        (None, [], "requirements.lock"),  # no nvidia-smi: the CPU path as before
        ("#!/bin/sh\nexit 9\n", [], "requirements.lock"),  # nvidia-smi without a working driver
        (None, ["GPU=1"], "requirements-gpu.lock"),
        (NVIDIA_SMI, ["GPU=0"], "requirements.lock"),
    ],
)
def test_make_picks_the_gpu_lock_when_a_gpu_is_listed(tmp_path, nvidia_smi, variables, lock):
    assert lock_make_would_install(tmp_path, nvidia_smi, *variables) == lock


def test_gpu_lock_is_the_cpu_lock_plus_cuda_libraries():
    lines = [line for line in (REPO / "requirements-gpu.lock").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "-r requirements.lock"
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= {
        line.split("==")[0] for line in lines[1:]
    }
    assert all("==" in line for line in lines[1:])


@pytest.mark.slow
def test_gpu_lock_resolves_against_the_package_index(tmp_path):
    """pip resolves the whole GPU lock (metadata only: --dry-run downloads no wheel and installs nothing)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            "-r",
            "requirements-gpu.lock",
        ],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    resolved = {
        item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]
    }
    assert resolved["tensorflow"] == "2.21.0" and "nvidia-cudnn-cu12" in resolved
