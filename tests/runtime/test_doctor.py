"""`huse doctor`: what this machine has, in lines a person reads (the JSON with --json)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

from huse.runtime import doctor


def _doctor(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "huse.runtime.cli", "doctor", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return out


def test_doctor_lists_each_extra_with_the_versions_it_found():
    lines = _doctor().stdout.splitlines()
    assert lines[0].startswith(f"huse-edge {importlib.metadata.version('huse-edge')}, Python ")
    extras = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert {"ort", "index", "scale", "serve", "sign", "minilm", "train", "export", "trt-cu12"} <= set(extras)
    assert "dev" not in extras and "bench" not in extras  # huse's own development extras stay out
    assert extras["ort"].split()[1] == "yes" and f"onnxruntime {importlib.metadata.version('onnxruntime')}" in extras["ort"]
    try:
        importlib.metadata.version("cuda-python")
    except importlib.metadata.PackageNotFoundError:  # as on the CPU machines: the line says what is missing
        assert extras["trt-cu12"].split()[1] == "no" and "missing tensorrt-cu12, cuda-python" in extras["trt-cu12"]
    assert lines[-1].startswith("backend: ")


def test_doctor_json_is_the_whole_report_and_only_json():
    env = json.loads(_doctor("--json").stdout)
    assert env["extras"] == json.loads(json.dumps(doctor.extras()))
    assert env["auto_backend"]["backend"] in ("onnxruntime", "tensorrt")


def test_a_version_outside_the_range_asked_for_is_named(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(doctor.importlib.metadata, "version",
                        lambda name: "1.10.0" if name == "onnxruntime" else real(name))
    ex = doctor.extras()
    assert ex["ort"]["outdated"] == ["onnxruntime 1.10.0 (needs >=1.17)"] and ex["ort"]["installed"]
    env = {"python": "3.11.7", "machine": "x86_64", "jetson": False, "extras": ex,
           "onnxruntime": {"error": "no module"}, "gpu": {"usable": False, "reason": "no GPU"},
           "tensorrt_build": {"supported": False, "reason": "no GPU"}}
    line = next(x for x in doctor.summary(env) if x.startswith("  ort "))
    assert "too old or new: onnxruntime 1.10.0 (needs >=1.17)" in line
    assert doctor.summary(env)[-1] == "TensorRT engine builds: no (the GPU's reason)"
