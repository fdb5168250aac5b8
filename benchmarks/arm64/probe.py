"""Which onnxruntime releases start under the emulator, with and without an Arm /proc/cpuinfo.

    python -m huse.benchmarks.arm64 probe --versions 1.19.2,1.27.0,1.28.0,1.32.0 --out probe.json

Why the pin in env.py is what it is: onnxruntime 1.28.0 and later crash at import (SIGSEGV) under
QEMU 7.2 when the emulated program reads the x86 host's /proc/cpuinfo, and start when it reads an
aarch64 kernel's (the sysroot's proc/cpuinfo, which QEMU's -L prefix puts in its place). Each
version is installed (cached) as aarch64 wheels and imported in a fresh emulated Python both ways,
on the same sysroot: a "bare" view of it links every top-level folder but proc/.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

from huse.benchmarks.arm64.env import CPU, Arm64Env, build_sysroot, cache_root, install_wheels, qemu_version

__all__ = ["probe_versions"]

_IMPORT = "import onnxruntime, numpy; print(onnxruntime.__version__, numpy.__version__)"


def _bare(sysroot: Path) -> Path:
    """The sysroot without its proc/ (so the host's /proc/cpuinfo shows through), as links."""
    bare = sysroot.parent / (sysroot.name + "-bare")
    bare.mkdir(exist_ok=True)
    for entry in sysroot.iterdir():
        link = bare / entry.name
        if entry.name != "proc" and not link.exists():
            link.symlink_to(entry)
    return bare


def probe_versions(versions: list[str], cpu: str = CPU, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Import each onnxruntime version under QEMU with the host's and with an Arm /proc/cpuinfo.

    Args:
        versions: onnxruntime versions with aarch64 wheels for CPython 3.11.
        cpu: QEMU's -cpu model.
        say: progress lines.

    Returns:
        {"qemu": ..., "cpu": ..., "versions": {version: {"host_cpuinfo": result, "arm_cpuinfo": result}}},
        each result "ok ORT NUMPY" or the last line the crash printed (e.g. QEMU's SIGSEGV line).
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    sysroot = build_sysroot(root, say)
    views = {"host_cpuinfo": _bare(sysroot), "arm_cpuinfo": sysroot}
    out: dict[str, Any] = {"qemu": qemu_version(), "cpu": cpu, "versions": {}}
    for v in versions:
        # Releases before 1.20 were built against numpy 1.x and fail to import beside numpy 2.
        numpy = "numpy<2" if tuple(int(x) for x in v.split(".")[:2]) < (1, 20) else "numpy==2.4.6"
        wheels = install_wheels(root / f"probe-onnxruntime-{v}", [f"onnxruntime=={v}", numpy], say)
        row = {}
        for view, prefix in views.items():
            env = Arm64Env(prefix, (wheels,), cpu)
            r = subprocess.run(env.python() + ["-c", _IMPORT], capture_output=True, text=True, env=env.environ(),
                               timeout=600)
            lines = (r.stdout + r.stderr).strip().splitlines()
            row[view] = f"ok {r.stdout.strip()}" if r.returncode == 0 else (lines[-1] if lines else f"exit {r.returncode}")
        say(f"onnxruntime {v}: host /proc/cpuinfo: {row['host_cpuinfo']}; Arm /proc/cpuinfo: {row['arm_cpuinfo']}")
        out["versions"][v] = row
    return out

