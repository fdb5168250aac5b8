"""`python -m huse.benchmarks.arm64 setup|check|fp16|probe`: a thin click layer over env.py, check.py, fp16.py and probe.py."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The lean runtime on aarch64 under QEMU user-mode emulation, compared with x86."""


@main.command()
def setup() -> None:
    """Build (or reuse) the aarch64 sysroot and wheel set under ~/.cache/huse/arm64 ($HUSE_ARM64_CACHE)."""
    def body():
        from huse.benchmarks.arm64.env import build_env

        with tempfile.TemporaryDirectory() as tmp:
            env = build_env(Path(tmp))
            click.echo(f"aarch64 environment ready: sysroot {env.sysroot}, wheels {env.site[1]}")
    run_cli(body)


@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV catalog of products.")
@click.option("--limit", default=200, help="Products classified (spread evenly over the catalog; emulation is slow).")
@click.option("--split", default="test", help="Products of this split, where the catalog has a split column.")
@click.option("--precisions", default="fp32,fp16,int8-cpu", help="Comma-separated; fp32 is always included.")
@click.option("--search/--no-search", default=True, help="Also build a flat index on x86 and search it from both sides.")
@click.option("--pin", "pins", multiple=True, help="Replace one aarch64 requirement, e.g. --pin onnxruntime==1.23.2 "
              "(repeatable; default: env.PINS).")
@click.option("--cpu", default="neoverse-n1", help="QEMU's -cpu model (max: every feature QEMU emulates, SVE and SME "
              "included; no shipping Arm core has them all).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--work", type=click.Path(file_okay=False), help="Keep both sides' outputs here (default: a temporary folder).")
def check(bundle, data, limit, split, precisions, search, pins, cpu, out, work) -> None:
    """Run `huse info`, `huse classify` (and `huse search`) on aarch64 and x86; exit 1 unless every bar is met."""
    def body():
        from huse.benchmarks.arm64.check import run_check
        from huse.benchmarks.arm64.env import with_pins

        with tempfile.TemporaryDirectory(prefix="huse-arm64-") as tmp:
            report = run_check(bundle, data, work or tmp, precisions=tuple(precisions.split(",")), limit=limit,
                               split=split, search=search, pins=with_pins(pins), cpu=cpu,
                               say=lambda s: click.echo(s, err=True))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"arm64 check {'passed' if report['passed'] else 'FAILED'}" + (f": {out}" if out else ""))
        if not report["passed"]:
            raise HuseError("the arm64 check missed a bar; see the lines above and arm64.json")
    run_cli(body)


@main.command(context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV catalog of products.")
@click.option("--limit", default=200, help="Products sampled as the check samples them; all run in fp32 on x86.")
@click.option("--rows", default=16, help="Of those, how many (smallest fp32 top-2 margin first) run on both sides.")
@click.option("--split", default="test", help="Products of this split, where the catalog has a split column.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--work", type=click.Path(file_okay=False), help="Keep graphs and outputs here (default: a temporary folder).")
def fp16(bundle, data, limit, rows, split, out, work) -> None:
    """Trace the fused fp16 graph's error on aarch64 versus x86: per tensor, and with node sets kept in fp32."""
    def body():
        from huse.benchmarks.arm64.fp16 import fp16_trace

        with tempfile.TemporaryDirectory(prefix="huse-arm64-fp16-") as tmp:
            report = fp16_trace(bundle, data, work or tmp, limit=limit, rows=rows, split=split,
                                say=lambda s: click.echo(s, err=True))
        text = json.dumps(report, indent=2) + "\n"
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
        click.echo(text if not out else f"written: {out}")
    run_cli(body)


@main.command()
@click.option("--versions", default="1.19.2,1.24.4,1.27.0,1.28.0,1.31.1,1.32.0", show_default=True,
              help="Comma-separated onnxruntime versions (aarch64 wheels for CPython 3.11).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
def probe(versions, out) -> None:
    """Import each onnxruntime version under QEMU with the host's and with an Arm /proc/cpuinfo."""
    def body():
        from huse.benchmarks.arm64.probe import probe_versions

        report = probe_versions(versions.split(","), say=click.echo)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
    run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
