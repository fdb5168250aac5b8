"""Machine description, memory readings and the matmul peak."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from huse.benchmarks.machine import gpu_memory_mib, machine_info, matmul_peak_flops


def test_machine_info_is_json_and_describes_this_process():
    info = machine_info()
    json.dumps(info)  # goes into the result file as is
    assert info["cpu"]["logical_cores"] >= info["cpu"]["physical_cores"] >= 1
    assert 0 < info["memory"]["available_mib"] <= info["memory"]["total_mib"]
    assert info["libraries"]["numpy"] == np.__version__
    assert info["python"]["executable"] == sys.executable
    assert set(info) >= {"cpu", "memory", "os", "libraries", "blas", "gpu", "threads_env"}


def test_machine_info_does_not_import_torch():
    # Versions come from package metadata: describing the machine must not cost a torch import.
    code = (
        "import sys; from huse.benchmarks.machine import machine_info; machine_info(); "
        "assert 'torch' not in sys.modules and 'tensorrt' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or Path("/etc/nv_tegra_release").exists(),
    reason="checks the no-GPU answer; this machine has an NVIDIA GPU",
)
def test_no_gpu_gives_none_not_an_error():
    assert gpu_memory_mib() is None
    assert machine_info()["gpu"] is None


def test_matmul_peak_flops_reports_a_consistent_rate():
    r = matmul_peak_flops(seconds=0.05, n=128)
    assert r["n"] == 128 and r["dtype"] == "float32" and r["iterations"] >= 1
    # The peak comes from the fastest call, so it is at least the median rate.
    assert r["flop_s"] >= r["flop_s_p50"] > 0
