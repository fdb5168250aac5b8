"""`huse doctor [--gpu BUNDLE]`: what this machine can run, and why the rest cannot.

Without --gpu it reports the backends, the GPU, TensorRT and the CUDA binding (cuda-python, the
CUDA version it was built for, the driver's), each with the reason when something is missing,
and ends with one line naming the backend `auto` picks and why; it needs only the core install
and exits 0 on any machine. With --gpu BUNDLE it prints the bundle's engines (DLA and GPU layer
counts for DLA engines) and runs the
one-time GPU acceptance (`huse.benchmarks.acceptance`: engines for every precision, Polygraphy
parity with onnxruntime, the gpu-marked tests, a latency run) and writes one JSON report. On a
machine without a usable GPU it says why and exits 1: it never reports a GPU result it did not measure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
from pathlib import Path
from typing import Any

import click

from huse.runtime._lazy import lazy_import
from huse.runtime.cli import run_cli

__all__ = ["engine_lines", "environment", "extras", "main", "summary"]


# Extras for people who develop huse itself, left out of the report.
_DEV_EXTRAS = ("dev", "bench", "decoders")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;(.*))?$")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def extras() -> dict[str, Any]:
    """Each extra of the installed huse-edge (from its own metadata: pyproject.toml's lists), with the version of each
    package it needs here, None where one is missing, and whether a version is outside the range asked for."""
    try:
        requires = importlib.metadata.requires("huse-edge") or []
    except importlib.metadata.PackageNotFoundError:
        return {"error": "huse-edge is not installed as a package (run from a source tree?): pip install -e ."}
    try:
        from packaging.specifiers import SpecifierSet  # pip's own dependency; present in nearly every venv
    except ImportError:
        SpecifierSet = None  # noqa: N806 (presence is still checked)
    out: dict[str, Any] = {}
    for line in requires:
        m = _REQUIREMENT.match(line)
        extra = _EXTRA.search((m.group(3) or "") if m else "")
        if not m or not extra or extra.group(1) in _DEV_EXTRAS:
            continue
        name, spec = m.group(1), m.group(2).strip()
        entry = out.setdefault(extra.group(1), {"packages": {}, "outdated": [], "installed": True})
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
            if name.startswith("tensorrt") and importlib.util.find_spec("tensorrt") is not None:
                version = "from the system (JetPack's python3-libnvinfer, not pip)"  # what Jetsons have
        entry["packages"][name] = version
        if version is None:
            entry["installed"] = False
        elif (SpecifierSet is not None and spec and version[0].isdigit()
              and not SpecifierSet(spec).contains(version, prereleases=True)):
            entry["outdated"].append(f"{name} {version} (needs {spec})")
    return out


def environment() -> dict[str, Any]:
    """What this machine has, for each backend, with the reason when something is missing."""
    from huse.runtime.backends import resolve_backend
    from huse.runtime.backends.onnxrt.runner import cuda_provider_status
    from huse.runtime.backends.trt.gpu import gpu_status
    from huse.runtime.backends.trt.loader import engine_support

    usable, reason, info = gpu_status()
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "jetson": Path("/etc/nv_tegra_release").exists(), "extras": extras(),
                           "gpu": {"usable": usable, "reason": reason, **info}}
    try:
        import onnxruntime as ort

        cuda_ok, cuda_why = cuda_provider_status()
        env["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers(),
                              "cuda": {"usable": cuda_ok, "reason": cuda_why}}
    except ImportError as e:
        env["onnxruntime"] = {"error": f"{e}; pip install 'huse-edge[ort]'"}
    ok, why = engine_support()
    env["tensorrt_build"] = {"supported": ok, "reason": why}
    if info.get("binding"):
        from huse.runtime.backends.trt.gpu import driver_mismatch

        env["gpu"]["driver_mismatch"] = driver_mismatch(info)
    backend, device, why = resolve_backend("auto")
    env["auto_backend"] = {"backend": backend, "device": device, "reason": why}
    return env


def engine_lines(manifest: dict) -> list[str]:
    """One line per TensorRT engine of a bundle: what it was built for and, on DLA, where its layers run.

    Args:
        manifest: the bundle's manifest.
    Returns:
        Lines such as "fp16 image: TensorRT 10.3.0, Orin (8.7), batch 8..8, DLA core 0: 61 layers on
        the DLA, 2 on the GPU"; one saying there are none when the bundle has no engines.
    """
    lines = []
    for e in manifest.get("engines", []):
        batches = sorted({(p["min"][0], p["max"][0]) for p in e.get("profile", {}).values()})
        batch = ", ".join(f"{lo}..{hi}" for lo, hi in batches) or "fixed"
        line = (f"{e.get('precision')} {e.get('graph')}: TensorRT {e.get('tensorrt_version')}, {e.get('gpu_name')} "
                f"({e.get('compute_capability')}), batch {batch}")
        if e.get("dla_core") is not None:
            line += (f", DLA core {e['dla_core']}: {e.get('dla_layers', '?')} layers on the DLA, "
                     f"{e.get('gpu_layers', '?')} on the GPU")
        lines.append(line)
    return lines or ["no TensorRT engines in this bundle (the runtime builds them on first use)"]


def summary(env: dict[str, Any]) -> list[str]:
    """`environment()` for people: what is installed, what runs the graphs, and why the rest cannot."""
    try:
        version = importlib.metadata.version("huse-edge")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    lines = [f"huse-edge {version}, Python {env['python']} on {env['machine']}" + (", Jetson" if env["jetson"] else "")]
    ex = env["extras"]
    if "error" in ex:
        lines.append(f"extras: {ex['error']}")
    else:
        lines.append("extras (pip install 'huse-edge[NAME]'):")
        for name, e in ex.items():
            if e["installed"]:
                state = "yes  " + ", ".join(f"{p} {v}" for p, v in e["packages"].items())
                if e["outdated"]:
                    state += "; too old or new: " + ", ".join(e["outdated"])
            else:
                state = "no   missing " + ", ".join(p for p, v in e["packages"].items() if v is None)
            lines.append(f"  {name:9}{state}")
    ort = env["onnxruntime"]
    if "error" in ort:
        lines.append(f"onnxruntime: {ort['error']}")
    else:
        cuda = "yes" if ort["cuda"]["usable"] else f"no ({ort['cuda']['reason']})"
        lines.append(f"onnxruntime {ort['version']}: {', '.join(ort['providers'])}; CUDA: {cuda}")
    gpu, build = env["gpu"], env["tensorrt_build"]
    lines.append("GPU: " + ("yes" if gpu["usable"] else f"no ({gpu['reason']})"))
    if gpu.get("driver_mismatch"):
        lines.append(f"  {gpu['driver_mismatch']}")
    lines.append("TensorRT engine builds: " + ("yes" if build["supported"] else
                                               "no (the GPU's reason)" if build["reason"] == gpu["reason"] else
                                               f"no ({build['reason']})"))
    return lines


@click.command()
@click.option("--gpu", "bundle", type=click.Path(exists=True, file_okay=False),
              help="Run the GPU acceptance on this bundle (needs an NVIDIA GPU or Jetson with TensorRT).")
@click.option("--out", default="gpu-acceptance", type=click.Path(file_okay=False), show_default=True)
@click.option("--eval-size", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the machine's report as JSON (for scripts) instead of lines.")
def main(bundle, out, eval_size, as_json) -> None:
    """Check this machine; with --gpu BUNDLE, run the one-time GPU acceptance and write a report."""
    def body():
        env = environment()
        auto = env["auto_backend"]
        if as_json:  # auto_backend is in it
            click.echo(json.dumps(env, indent=1))
        else:
            click.echo("\n".join(summary(env)))
            click.echo(f"backend: {auto['backend']} on {auto['device']} ({auto['reason']})")
        if bundle is None:
            return
        from huse.runtime.bundle import load_manifest

        for line in engine_lines(load_manifest(Path(bundle))):
            click.echo(f"engine {line}")
        acceptance = lazy_import("huse.benchmarks.acceptance", "bench,export")
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = acceptance.gpu_acceptance(Path(bundle), out_dir, eval_size, env)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        for c in report["comparisons"]:
            click.echo(f"{c['precision']:5} {c['graph']:6} max|trt-ort| {c['max_abs_diff']:.3g}  "
                       f"top-1 agreement {100 * c['top1_agreement']:.2f}%  top-1 {100 * c['top1_tensorrt']:.2f}%")
        click.echo(f"report: {out_dir / 'report.json'}")
    run_cli(body)


if __name__ == "__main__":
    main()
