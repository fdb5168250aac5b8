"""Decoding and bundle-verification costs of the reliability features (issue 12).

    python -m huse.benchmarks.decode [--bundle B] [--scale full|tiny] [--out decode.json]

Measures, on generated images (no downloads):
- decode + preprocess time of a large JPEG with `jpeg_draft` on and off (the draft path decodes
  at 1/2..1/8 scale through libjpeg's DCT scaling);
- peak RSS of one decode of a 16-bit greyscale PNG, in a fresh process, with the default
  decoded-bytes cap and with the cap lifted (what it costs without the cap);
- with --bundle: load_manifest time (sha256 of every file) and the Ed25519 signature check.
`--scale tiny` runs every step on small sizes in seconds (a correctness check, not a measurement).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from huse.runtime.preprocess import ImageSpec, load_image

SCALES = {"full": {"jpeg": (4000, 3000), "deep": 7000, "repeats": 20},
          "tiny": {"jpeg": (640, 480), "deep": 600, "repeats": 2}}

PEAK = r"""
import resource, sys, dataclasses
from huse.runtime.preprocess import ImageSpec, load_image
from huse.runtime.errors import HuseError
spec = ImageSpec(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)
if sys.argv[2] == "lifted":
    spec = dataclasses.replace(spec, max_bytes=2**40)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(sys.argv[1], spec); outcome = "decoded"
except HuseError as e:
    outcome = "refused"
print(outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _time(fn, repeats: int) -> float:
    fn()  # warm
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def run(scale: str, bundle: str | None) -> dict:
    cfg = SCALES[scale]
    rng = np.random.default_rng(0)
    w, h = cfg["jpeg"]
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    out: dict = {"scale": scale, "jpeg": {"size": [w, h], "bytes": len(jpeg)}}
    for draft in (False, True):
        spec = ImageSpec(size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, jpeg_draft=draft)
        out["jpeg"][f"ms_draft_{'on' if draft else 'off'}"] = _time(lambda: load_image(jpeg, spec), cfg["repeats"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deep.png"
        side = cfg["deep"]
        Image.fromarray(np.tile(np.arange(side, dtype=np.uint16), (side, 1)) * 9).save(path)
        out["deep_png"] = {"side": side, "file_bytes": path.stat().st_size}
        for cap in ("default", "lifted"):
            res = subprocess.run([sys.executable, "-c", PEAK, str(path), cap], capture_output=True, text=True, check=True)
            outcome, mib = res.stdout.split()
            out["deep_png"][f"cap_{cap}"] = {"outcome": outcome, "peak_rss_growth_mib": int(mib)}
    if bundle:
        from huse.runtime.bundle import MANIFEST, load_manifest
        from huse.runtime.signing import verify_signature, write_keypair

        out["bundle"] = {"load_manifest_ms": _time(lambda: load_manifest(bundle), max(1, cfg["repeats"] // 4))}
        with tempfile.TemporaryDirectory() as tmp:
            priv, pub = write_keypair(Path(tmp) / "k")
            from huse.runtime.signing import add_signature

            data = (Path(bundle) / MANIFEST).read_bytes()
            copy = Path(tmp) / "b"
            copy.mkdir()
            add_signature(copy, data, priv)
            out["bundle"]["verify_signature_ms"] = _time(lambda: verify_signature(copy, data, [pub]), cfg["repeats"])
    return out


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Also time verifying this bundle.")
@click.option("--scale", type=click.Choice(sorted(SCALES)), default="full")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the figures as JSON here.")
def main(bundle, scale, out) -> None:
    """Time JPEG draft decoding, measure the byte cap's effect on memory, time bundle verification."""
    res = run(scale, bundle)
    j = res["jpeg"]
    click.echo(f"JPEG {j['size'][0]}x{j['size'][1]} -> 64x64: {j['ms_draft_off']:.1f} ms full decode, "
               f"{j['ms_draft_on']:.1f} ms draft ({j['ms_draft_off'] / j['ms_draft_on']:.1f}x)")
    d = res["deep_png"]
    click.echo(f"16-bit {d['side']}x{d['side']} PNG ({d['file_bytes'] / 1e3:.0f} kB): default cap -> "
               f"{d['cap_default']['outcome']}, +{d['cap_default']['peak_rss_growth_mib']} MiB; cap lifted -> "
               f"{d['cap_lifted']['outcome']}, +{d['cap_lifted']['peak_rss_growth_mib']} MiB")
    if "bundle" in res:
        b = res["bundle"]
        click.echo(f"bundle: load_manifest (sha256 of every file) {b['load_manifest_ms']:.1f} ms; "
                   f"Ed25519 signature check {b['verify_signature_ms']:.2f} ms")
    if out:
        Path(out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
