"""The numeric environment: parsed from the CPU's own description, compared key by key in words."""

import os
import subprocess
import sys

import pytest

from pipeline.numerics import cpu_fingerprint, differences

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 hypervisor aes

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_cpu_fingerprint_keeps_what_kernels_dispatch_on(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    cpu = cpu_fingerprint(cpuinfo)
    assert cpu["cpu.vendor"] == "AuthenticAMD"
    assert cpu["cpu.family_model_stepping"] == "25/17/1"
    # Virtualisation and crypto flags change no arithmetic; the model name alone hides the ISA.
    assert cpu["cpu.isa"] == "sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_bf16"
    assert int(cpu["cpu.cores"]) >= 1


def test_differences_are_named_in_words():
    reference = {
        "cpu.isa": "avx avx2 fma avx512f avx512bw",
        "onednn": "on",
        "threads.intra_op": "0",
        "tensorflow.version": "2.21.0",
    }
    here = {"cpu.isa": "avx avx2 fma", "onednn": "off", "threads.intra_op": "0", "tensorflow.version": "2.21.0"}
    assert differences(reference, here) == [
        "CPU ISA: avx512f avx512bw in the reference only",
        "oneDNN (TF_ENABLE_ONEDNN_OPTS): off here, on in the reference",
    ]
    assert differences(here, here) == []
    assert differences({}, {"gpu": "NVIDIA H100"}) == ["GPU: NVIDIA H100 here, none in the reference"]


@pytest.mark.parametrize("setting, expected", [(None, "True on"), ("0", "False off")])
def test_the_pipeline_runs_tensorflow_with_onednn_and_records_what_tensorflow_does(setting, expected):
    """On by default on every CPU (TensorFlow's own default leaves AVX2 CPUs without it), off when
    TF_ENABLE_ONEDNN_OPTS=0, and the recorded fingerprint says what TensorFlow actually does."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    probe = (
        "from pipeline import numerics; from tensorflow.python.util import _pywrap_util_port; "
        "print(_pywrap_util_port.IsMklEnabled(), numerics.numeric_environment()['onednn'])"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[-2] == expected
