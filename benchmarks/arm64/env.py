"""The aarch64 side of the check: a Debian sysroot with Python 3.11, the lean runtime's wheels, and the
command that runs them under QEMU user-mode emulation (`qemu-aarch64-static -L SYSROOT`).

The sysroot and the wheel set are built once and cached under ~/.cache/huse/arm64/ (or $HUSE_ARM64_CACHE),
each in a folder keyed by what went into it; the project's own wheel is built from the working tree on
every run, so the check always runs the code at hand.

Building the sysroot needs the arm64 architecture in dpkg (`dpkg --add-architecture arm64 && apt-get
update`, as root once: `make arm64-setup` does it) and apt-get; the wheels need PyPI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huse.runtime.errors import HuseError

__all__ = ["ARM_CPUINFO", "CPU", "PINS", "QEMU", "Arm64Env", "build_env", "build_sysroot", "cache_root",
           "install_wheels", "qemu_version", "with_pins"]

QEMU = "qemu-aarch64-static"
# The emulated core: Neoverse-N1 (AWS Graviton2, Ampere Altra) is Armv8.2 with dot-product and fp16
# arithmetic and no SVE or i8mm, like the Cortex-A78AE cores of a Jetson Orin; QEMU's default (`max`)
# adds SVE, SME and i8mm, which no Jetson has.
CPU = "neoverse-n1"
PYTHON = "python3.11"  # Debian 12's; JetPack 6 (Ubuntu 22.04) has 3.10, which this check does not run
# python3.11's runtime closure comes from apt-cache depends; onnxruntime and faiss are C++ and need libstdc++.
ROOT_PACKAGES = ("python3.11", "libstdc++6")
SKIP_PACKAGES = ("dpkg", "tar", "install-info")  # in the closure for maintainer scripts, never run here
# What the check installs: the lean runtime's dependencies and FAISS for `huse search`, nothing else.
# onnxruntime 1.32.0, the version the x86 side runs, so that any difference is the architecture's.
# 1.28.0-1.32.0 crash at import under QEMU 7.2 unless the sysroot has an Arm /proc/cpuinfo (ARM_CPUINFO
# below): QEMU 7.2 shows an aarch64 program the x86 host's /proc/cpuinfo, which has no MIDR (CPU
# implementer/part), and the cpuinfo library bundled since 1.28 dereferences NULL on it while reading
# the cache topology. Every aarch64 kernel writes a MIDR, so this is the emulator's limit, not Arm's
# (`python -m huse.benchmarks.arm64 probe` reproduces it; 1.19.2-1.27.0 start without it).
PINS = ("onnxruntime==1.32.0", "numpy==2.4.6", "Pillow==13.0.0", "click==8.5.1", "faiss-cpu==1.15.1")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# What an aarch64 Linux kernel writes for a 2-core Neoverse-N1 (AWS Graviton2's /proc/cpuinfo, MIDR
# 0x413fd0c1): QEMU's -L prefix makes the emulated program read it in place of the host's.
ARM_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
    "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(2))


def with_pins(overrides: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """PINS with each override replacing the pin of the same package (e.g. "onnxruntime==1.23.2").

    Args:
        overrides: requirement strings NAME==VERSION.

    Returns:
        The requirements to install.
    """
    def name(req: str) -> str:
        return req.split("==")[0].strip().lower()

    for req in overrides:
        if "==" not in req or name(req) not in {name(p) for p in PINS}:
            raise HuseError(f"--pin takes NAME==VERSION for one of {', '.join(name(p) for p in PINS)}; got {req!r}")
    chosen = {name(r): r for r in overrides}
    return tuple(chosen.get(name(p), p) for p in PINS)


def cache_root() -> Path:
    """~/.cache/huse/arm64, or $HUSE_ARM64_CACHE."""
    return Path(os.environ.get("HUSE_ARM64_CACHE") or Path.home() / ".cache" / "huse" / "arm64")


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise HuseError(f"{what}: {cmd[0]} is not installed ({e})") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-8:]
        raise HuseError(f"{what} failed (exit {r.returncode}): {' '.join(cmd[:6])} ...\n" + "\n".join(tail))
    return r


def qemu_version() -> str:
    """The first line of `qemu-aarch64-static --version`; a HuseError naming the package when absent."""
    if shutil.which(QEMU) is None:
        raise HuseError(f"{QEMU} is not installed; apt-get install qemu-user-static (or `make arm64-setup` as root)")
    return _run([QEMU, "--version"], "qemu").stdout.splitlines()[0]


def _sysroot_packages() -> list[str]:
    """python3.11's runtime closure for arm64, from apt-cache (Debian's own dependency list)."""
    if "arm64" not in _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split():
        raise HuseError("dpkg has no arm64 architecture, so apt cannot fetch the aarch64 Python; as root run "
                        "`dpkg --add-architecture arm64 && apt-get update` (or `make arm64-setup`)")
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances"] + [f"{p}:arm64" for p in ROOT_PACKAGES],
               "apt-cache depends").stdout
    names = {line.strip() for line in out.splitlines() if line.endswith(":arm64") and not line.startswith(" ")}
    return sorted(n for n in names | {f"{p}:arm64" for p in ROOT_PACKAGES} if n.split(":")[0] not in SKIP_PACKAGES)


def _versions(packages: list[str]) -> list[str]:
    """package=version for each, from apt's candidate (what apt-get download fetches)."""
    out = _run(["apt-cache", "policy"] + packages, "apt-cache policy").stdout
    versions, name = [], None
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.rstrip(":")
        elif line.strip().startswith("Candidate:") and name:
            versions.append(f"{name}={line.split(':', 1)[1].strip()}")
    return versions


def build_sysroot(root: Path, say=print) -> Path:
    """Debian's arm64 python3.11 and its runtime closure unpacked under `root` (cached: reused when complete),
    with an Arm /proc/cpuinfo.

    Args:
        root: the cache folder.
        say: progress lines.

    Returns:
        The sysroot folder.
    """
    pinned = _versions(_sysroot_packages())
    dest = root / f"sysroot-{_key(CPU, ARM_CPUINFO, *pinned)}"
    if (dest / ".complete").is_file():
        return dest
    say(f"building the aarch64 sysroot ({len(pinned)} Debian packages) in {dest}")
    tmp = Path(tempfile.mkdtemp(prefix="sysroot-", dir=root))
    debs = tmp / "debs"
    debs.mkdir()
    _run(["apt-get", "download", "-q"] + pinned, "apt-get download of the arm64 packages", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
    shutil.rmtree(debs)
    (tmp / "proc").mkdir(exist_ok=True)
    (tmp / "proc" / "cpuinfo").write_text(ARM_CPUINFO)
    (tmp / "packages.txt").write_text("\n".join(pinned) + "\n")
    (tmp / ".complete").write_text("")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def install_wheels(dest: Path, requirements: list[str], say=print) -> Path:
    """pip-install aarch64 wheels for CPython 3.11 into `dest` (cached: reused when complete).

    Args:
        dest: the folder (a --target for pip).
        requirements: pip requirement strings, e.g. ["onnxruntime==1.32.0"].
        say: progress lines.

    Returns:
        dest.
    """
    if (dest / ".complete").is_file():
        return dest
    say(f"installing aarch64 wheels {' '.join(requirements)} into {dest}")
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=dest.parent))
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
          *platforms, "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:", *requirements],
         "pip install of the aarch64 wheels")
    (tmp / ".complete").write_text("\n".join(requirements) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _project_wheel(work: Path) -> Path:
    """Build huse-edge's own wheel from the working tree (pure Python) into work/."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise HuseError(f"the arm64 check installs huse-edge from its source checkout, and {root} has no "
                        "pyproject.toml; run it from a clone (pip install -e .)")
    # From a copy: setuptools builds in the source tree's build/, which two checks at once would share.
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    for stale in work.glob("huse_edge-*.whl"):
        stale.unlink()
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "bundles", "data",
                                                             "bench-results", "results", "*.egg-info", "__pycache__"))
    # With build isolation: a venv's own setuptools may be older than pyproject's build requirement.
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", str(work),
          str(src)], "building huse-edge's wheel")
    return next(work.glob("huse_edge-*.whl"))


@dataclass
class Arm64Env:
    """A ready aarch64 environment: the command prefix that runs its Python under QEMU.

    Args:
        sysroot: the Debian arm64 root QEMU resolves absolute paths in first (-L).
        site: folders on the emulated Python's path, the project's first.
        cpu: QEMU's -cpu model.
    """

    sysroot: Path
    site: tuple[Path, ...]
    cpu: str = CPU

    def python(self) -> list[str]:
        """The argv prefix of the emulated Python (append `-m module ...` or `-c code`)."""
        return [QEMU, "-cpu", self.cpu, "-L", str(self.sysroot), str(self.sysroot / "usr" / "bin" / PYTHON)]

    def environ(self) -> dict[str, str]:
        """os.environ with PYTHONPATH set to this environment's folders (nothing from the host's venv)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in self.site)
        return env


def build_env(work: Path, *, pins: tuple[str, ...] = PINS, cpu: str = CPU, say=print) -> Arm64Env:
    """The sysroot and wheels (cached), and huse-edge from the working tree installed with no extras.

    Args:
        work: a scratch folder of this run (the project's wheel and install go here).
        pins: the aarch64 requirements (default PINS).
        cpu: QEMU's -cpu model.
        say: progress lines.

    Returns:
        An Arm64Env whose Python imports huse.runtime, numpy, Pillow, click, onnxruntime and faiss.
    """
    qemu_version()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    sysroot = build_sysroot(root, say)
    wheels = install_wheels(root / f"wheels-{_key(*pins, *PLATFORMS)}", list(pins), say)
    wheel = _project_wheel(work / "dist")
    project = work / "huse-edge"
    # No dependencies: they are the pinned wheels above, and [train]/[export] (torch, onnx) are never installed.
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target",
          str(project), str(wheel)], "installing huse-edge into the aarch64 environment")
    return Arm64Env(sysroot, (project, wheels), cpu)
