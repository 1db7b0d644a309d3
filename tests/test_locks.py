"""The install: which lock `make` installs, what each lock holds, and that they resolve.

What can be checked without a GPU (no test here runs TensorFlow on one).
"""

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, run
from tools.lock import NEVER_IMPORTED, PACKAGING_TOOLS

NVIDIA_SMI = "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n"
# Only tests, lint and docs import these: none may be in what `make run` installs.
TEST_ONLY = {"pytest", "pytest-xdist", "moto", "cfn-lint", "sympy", "ruff", "mkdocs", "mkdocs-material"}


def pins(lock: str) -> dict[str, str]:
    """{canonical name: version} of a lock."""
    lines = (REPO / lock).read_text().splitlines()
    return {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in (line.split("==") for line in lines if re.match(r"^[A-Za-z0-9]", line))
    }


def make_dry_run(tmp_path, nvidia_smi: str | None, *arguments: str) -> list[str]:
    """The commands `make -n` prints, with a stand-in nvidia-smi (or none) on PATH."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    if nvidia_smi:
        (tools / "nvidia-smi").write_text(nvidia_smi)
        (tools / "nvidia-smi").chmod(0o755)
    return run(REPO, ["make", "-n", *arguments], {"PATH": f"{tools}:/usr/bin:/bin"}).stdout.splitlines()


@pytest.mark.parametrize(
    "nvidia_smi, variables, lock",
    [
        (NVIDIA_SMI, [], "requirements-gpu.lock"),  # a GPU is listed
        (None, [], "requirements.lock"),  # no nvidia-smi: the CPU build
        ("#!/bin/sh\nexit 9\n", [], "requirements.lock"),  # nvidia-smi without a working driver
        (None, ["GPU=1"], "requirements-gpu.lock"),
        (NVIDIA_SMI, ["GPU=0"], "requirements.lock"),
    ],
)
def test_make_picks_the_gpu_lock_when_a_gpu_is_listed(tmp_path, nvidia_smi, variables, lock):
    # -B: as if nothing were installed, so that the install recipe is printed; -n runs nothing.
    commands = make_dry_run(tmp_path, nvidia_smi, "-B", ".venv/.installed", *variables)
    assert f".venv/bin/pip install --no-compile --no-deps -r {lock}" in commands
    assert "rm -rf .venv" in commands  # one lock per venv: never the other build on top of the first


@pytest.mark.parametrize("target", ["test", "test-fast", "lint", "docs", "docs-serve"])
def test_the_test_targets_add_the_dev_lock_and_run_does_not(tmp_path, target):
    # -o: the runtime install counts as done; -W: as if the dev lock had changed since it was added.
    variables = ["-o", ".venv/.installed", "-W", "requirements-dev.lock", "GPU=0"]
    assert ".venv/bin/pip install --no-compile --no-deps -r requirements.lock -r requirements-dev.lock" in make_dry_run(
        tmp_path, None, *variables, target
    )
    assert not [line for line in make_dry_run(tmp_path, None, *variables, "run") if "pip install" in line]


def test_the_runtime_lock_has_the_cpu_build_and_no_test_package():
    cpu, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert cpu["tensorflow-cpu"] == "2.21.0" and "tensorflow" not in cpu
    assert not TEST_ONLY & set(cpu) and TEST_ONLY <= set(dev)
    assert not set(cpu) & set(dev)  # the dev lock adds, it never re-pins
    assert not [name for name in cpu if name.startswith("nvidia-")]  # no CUDA library, no NVML


def test_the_gpu_lock_is_the_runtime_lock_with_the_cuda_build_and_nvml():
    cpu, gpu = pins("requirements.lock"), pins("requirements-gpu.lock")
    assert gpu["tensorflow"] == cpu["tensorflow-cpu"] and "tensorflow-cpu" not in gpu
    # MLflow's GPU monitor imports pynvml, which nvidia-ml-py provides (mlflow/system_metrics/metrics/gpu_monitor.py).
    assert "nvidia-ml-py" in gpu
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= set(gpu)
    shared = set(cpu) - {"tensorflow-cpu"}
    assert shared <= set(gpu) and {name: gpu[name] for name in shared} == {name: cpu[name] for name in shared}
    assert all(name.startswith("nvidia-") for name in set(gpu) - shared - {"tensorflow"})


@pytest.mark.slow
@pytest.mark.parametrize("locks", [["requirements-gpu.lock"], ["requirements.lock", "requirements-dev.lock"]])
def test_the_locks_resolve_against_the_package_index(tmp_path, locks):
    """pip resolves each install as a whole (metadata only: --dry-run downloads no wheel, installs nothing)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
        + ["--report", str(report), *(argument for lock in locks for argument in ("-r", lock))],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower() for item in json.loads(report.read_text())["install"]
    }
    expected = {name for lock in locks for name in pins(lock)}
    assert expected <= resolved and resolved - expected <= PACKAGING_TOOLS | NEVER_IMPORTED


def test_make_reproduce_names_a_tensorflow_build_difference():
    """The two builds gave bit-identical weights on one machine (docs/install.md); a result made under the
    other build is still named as another numeric environment, as any other difference is."""
    from pipeline import numerics

    assert numerics.differences({"tensorflow.build": "CUDA"}, {"tensorflow.build": "CPU"}) == [
        "TensorFlow build: CPU here, CUDA in the reference"
    ]
