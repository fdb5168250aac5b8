"""Preparation (decode, resize, normalise) per item against the decoder alone (issue 20).

    python -m huse.benchmarks.prepare --out bench-results/prepare.json            # the lead's timed run
    python -m huse.benchmarks.prepare --out /tmp/p.json --scale tiny              # correctness check, seconds

Image sets, written to a temporary folder:
- `fashion-png`: fashion-products' PNG photos (`huse data export`, or `--fashion CATALOG`), 28x28 greyscale;
- `jpeg-400`, `jpeg-800`, `jpeg-1600`, `png-800`: real photographs (scikit-image's bundled photos, which
  ship with the bench environment, plus every JPEG/PNG under `--photos DIR`), scaled so that the long side
  is that many pixels and re-encoded as JPEG quality 90 or PNG: the sizes of catalog photos.

Measured on one core (the process pinned to one CPU), in interleaved rounds (round r of every
configuration before round r+1 of any), medians and ranges of the per-round figures:
1. prepare per item: `load_images` on batches of 64 files, input 64 and 224, JPEG draft on and off;
2. the plain Pillow loop a user would write (read, open, RGB, resize, asarray) on fashion PNGs, in the same
   rounds, and each decoder alone on the same files (read + decode; draft-scaled to at least the input size, and
   full): Pillow (what the runtime uses) and, where installed, simplejpeg, OpenCV's `imdecode` and
   PyTurboJPEG, with whether their pixels equal Pillow's (they must, to serve bundles trained with Pillow);
3. per-stage costs (read, decode, resize, normalise; tokenise for fashion-products' titles);
4. the prepare pool: items/s with 1..N threads on all cores, a whole batch or a slice of 8 per task, and the
   scaling efficiency.
Bars (issue 20): fashion PNGs prepare <= 45 us per item; real 800 px JPEGs at input 64 prepare <= 1.3x
Pillow's own draft-scaled decode of the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from huse.runtime.preprocess import ImageSpec, load_image, load_images, normalise
from huse.runtime.preprocess import _decode_small_pngs, _read_file, _small_png  # the small-PNG path's steps

SCALES = {  # rounds, seconds per configuration per round, fashion PNGs, real photos per size
    "full": dict(rounds=5, seconds=1.0, fashion=2000, photos=None),
    "tiny": dict(rounds=1, seconds=0.05, fashion=128, photos=3),
}
SIDES = (400, 800, 1600)
INPUTS = (64, 224)
BATCH = 64
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "motorcycle_right", "rocket",
                  "hubble_deep_field", "retina", "horse", "brick", "grass", "gravel")  # photographs, not drawings
BARS = {"fashion_png_prepare_us": 45.0, "jpeg800_prepare_vs_draft_decode": 1.3}


def _spec(side: int, draft: bool = True) -> ImageSpec:
    return ImageSpec(size=(side, side), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), jpeg_draft=draft)


# ------------------------------------------------------------------------------------------
# Image sets


def real_photos(dirs: list[Path], limit: int | None) -> list[Image.Image]:
    """RGB photographs: scikit-image's bundled ones, then every JPEG/PNG under `dirs`."""
    import skimage.data

    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            a = getattr(skimage.data, name)()
        except Exception:  # a name this scikit-image lacks, or one it would download
            continue
        photos.append(Image.fromarray(a).convert("RGB"))
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                with Image.open(p) as img:
                    photos.append(img.convert("RGB"))
    return photos[:limit] if limit else photos


def write_sets(folder: Path, photos: list[Image.Image], fashion: list[Path]) -> dict[str, list[Path]]:
    sets = {"fashion-png": fashion}
    for side in SIDES:
        sets[f"jpeg-{side}"] = []
    sets["png-800"] = []
    for k, img in enumerate(photos):
        for side in SIDES:
            scale = side / max(img.size)
            im = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                            Image.Resampling.LANCZOS)
            path = folder / f"photo{k}-{side}.jpg"
            im.save(path, "JPEG", quality=90)
            sets[f"jpeg-{side}"].append(path)
            if side == 800:
                im.save(folder / f"photo{k}-800.png")
                sets["png-800"].append(folder / f"photo{k}-800.png")
    return sets


def fashion_files(folder: Path, catalog: Path | None, n: int) -> tuple[list[Path], list[str]]:
    """Paths and titles of fashion-products' PNGs (exported here unless a catalog is given)."""
    from huse.runtime.catalog import iter_catalog

    if catalog is None:
        subprocess.run([sys.executable, "-m", "huse.runtime.cli", "data", "export", "fashion-products",
                        str(folder / "fashion"), "--limit", str(n)], check=True, capture_output=True)
        catalog = folder / "fashion" / "catalog.csv"
    recs = [r for r in iter_catalog(catalog) if not r.error][:n]
    return [Path(r.image) for r in recs], [r.name or "" for r in recs]


# ------------------------------------------------------------------------------------------
# Timing


def per_item_us(fn: Callable[[list[Path]], object], files: list[Path], seconds: float) -> float:
    """Microseconds per item of fn over batches of the files, cycling for at least `seconds`."""
    batches = [files[s:s + BATCH] for s in range(0, len(files), BATCH)]
    fn(batches[0])  # warm
    n, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            fn(b)
            n += len(b)
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt / n * 1e6


def interleaved(configs: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict]:
    runs: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for k, fn in configs.items():
            runs[k].append(fn())
    return {k: {"median": float(np.median(v)), "range": [float(min(v)), float(max(v))], "runs": v}
            for k, v in runs.items()}


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _reduction(size: tuple[int, int], side: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) that keeps both sides >= side (as Pillow's draft picks)."""
    for k in (8, 4, 2):
        if min(size) // k >= side:
            return k
    return 1


def decoders(side: int | None) -> dict[str, Callable[[Path], np.ndarray]]:
    """Read + decode one file to RGB pixels, draft-scaled to >= side (None: full), per installed decoder."""
    def pillow(path):
        img = Image.open(io.BytesIO(_read(path)))
        if side and img.format == "JPEG":
            img.draft("RGB", (side, side))
        return np.asarray(img.convert("RGB"))

    out = {"pillow": pillow}
    try:
        import simplejpeg

        def sj(path):
            data = _read(path)
            if not simplejpeg.is_jpeg(data):
                return None
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side or 0, min_width=side or 0)
        out["simplejpeg"] = sj
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}

        def ocv(path):
            data = np.frombuffer(_read(path), np.uint8)
            k = 1
            if side and path.suffix == ".jpg":
                with Image.open(path) as probe:
                    k = _reduction(probe.size, side)
            return cv2.cvtColor(cv2.imdecode(data, flags[k]), cv2.COLOR_BGR2RGB)
        out["opencv"] = ocv
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()

        def turbo(path):
            data = _read(path)
            k = 1
            if side:
                w, h, *_ = tj.decode_header(data)
                k = _reduction((w, h), side)
            return tj.decode(data, pixel_format=0, scaling_factor=(1, k))  # TJPF_RGB
        out["turbojpeg"] = turbo
    except Exception:  # ImportError, or libturbojpeg missing
        pass
    return out


def pillow_loop(side: int) -> Callable[[list[Path]], np.ndarray]:
    """The plain loop a user would write with Pillow (read, open, RGB, bilinear resize, `np.asarray` into a
    batch), without the runtime's checks, caps, EXIF, alpha or normalisation: what "costs what the decoder
    costs" is measured against, in the same process and rounds (absolute figures move with the machine)."""
    def run(files: list[Path]) -> np.ndarray:
        out = np.empty((len(files), side, side, 3), np.uint8)
        for k, f in enumerate(files):
            img = Image.open(io.BytesIO(_read(f))).convert("RGB")
            out[k] = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR))
        return out
    return run


def stage_breakdown(files: list[Path], spec: ImageSpec, titles: list[str] | None = None,
                    tokenizer=None, seconds: float = 0.5) -> dict[str, float]:
    """Microseconds per item of each preparation step on the calling thread, the runtime's steps one at a
    time: read the file, decode (draft-scaled when the spec says so, upright, RGB or L), resize into the
    batch buffer, normalise the batch; tokenise the titles when given. `prepare` is `load_images` whole.
    When every file is a small plain PNG (fashion-products), the steps of the path those take instead:
    `read_whole` (one os.read), `small_png_parse` (the chunks), `small_png_decode_resize` (Pillow's decoder into
    one tall image per batch, resized as a batch); `decode` and `resize` stay Pillow's usual per-image calls."""
    h, w = spec.size
    datas = [_read(f) for f in files]
    decoded = []
    for d in datas:
        img = Image.open(io.BytesIO(d))
        if spec.jpeg_draft and img.format == "JPEG":
            img.draft(None, (max(h, w), max(h, w)))
        img.load()
        decoded.append(img if img.mode in ("RGB", "L") else img.convert("RGB"))
    pixels = np.empty((len(files), 3, h, w), np.uint8)

    def read(_):
        for f in files:
            _read(f)

    def decode(_):
        for d in datas:
            img = Image.open(io.BytesIO(d))
            if spec.jpeg_draft and img.format == "JPEG":
                img.draft(None, (max(h, w), max(h, w)))
            img.load()

    def resize(_):
        for k, img in enumerate(decoded):
            a = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR) if img.size != (w, h) else img)
            pixels[k] = a.transpose(2, 0, 1) if a.ndim == 3 else a

    def norm(_):
        for s in range(0, len(files), BATCH):
            normalise(pixels[s:s + BATCH], spec)

    steps = {"read": read, "decode": decode, "resize": resize, "normalise": norm,
             "prepare": lambda _: [load_images(files[s:s + BATCH], spec) for s in range(0, len(files), BATCH)]}
    smalls = [_small_png(d, spec.max_pixels, spec.max_bytes) for d in datas]
    if all(smalls):
        block = np.empty((BATCH, 3, h, w), np.uint8)
        steps["read_whole"] = lambda _: [_read_file(f, None) for f in files]
        steps["small_png_parse"] = lambda _: [_small_png(d, spec.max_pixels, spec.max_bytes) for d in datas]
        steps["small_png_decode_resize"] = lambda _: [_decode_small_pngs(smalls[s:s + BATCH], spec, block,
                                                                         list(range(len(smalls[s:s + BATCH]))))
                                                     for s in range(0, len(smalls), BATCH)]
    if titles is not None and tokenizer is not None:
        from huse.runtime.tokenizer import normalise_title

        steps["tokenise"] = lambda _: [tokenizer.inputs([normalise_title(t) or "" for t in titles[s:s + BATCH]])
                                       for s in range(0, len(titles), BATCH)]
    out = {}
    for name, fn in steps.items():
        fn(None)  # warm
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n == 0:
            fn(None)
            n += 1
        out[f"{name}_us"] = (time.perf_counter() - t0) / n / len(files) * 1e6
    return out


def thread_scaling(files: list[Path], spec: ImageSpec, seconds: float, max_threads: int,
                   chunks: tuple[int, ...] = (BATCH, 8)) -> list[dict]:
    """Items/s of a prepare pool of T threads, T = 1..max_threads, each task `load_images` on `chunk` files:
    a whole batch per task (what the bulk engine submits) or slices of one (a batch spread over the threads).
    Efficiency is against one thread with the same chunk."""
    rows = []
    for chunk in chunks:
        tasks = [files[s:s + chunk] for s in range(0, len(files), chunk)]
        first = len(rows)
        for t in range(1, max_threads + 1):
            with ThreadPoolExecutor(t) as pool:
                list(pool.map(lambda b: load_images(b, spec), tasks[:t]))  # warm every thread
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds or n == 0:
                    n += sum(len(r) for r in pool.map(lambda b: load_images(b, spec), tasks * t))
                rate = n / (time.perf_counter() - t0)
            rows.append({"threads": t, "chunk": chunk, "items_s": rate})
        for r in rows[first:]:
            r["efficiency"] = r["items_s"] / (r["threads"] * rows[first]["items_s"])
    return rows


def parity(files: list[Path], spec: ImageSpec) -> bool:
    """The batch path gives each image the bytes `load_image` (what training calls) gives it alone."""
    batch = load_images(files, spec)
    return all(np.array_equal(batch.array[r], load_image(files[i], spec)) for i, r in batch.rows.items())


# ------------------------------------------------------------------------------------------


def run(sc: dict, folder: Path, fashion_catalog: Path | None, photo_dirs: list[Path]) -> dict:
    from huse.runtime.tokenizer import WordTokenizer

    fashion, titles = fashion_files(folder, fashion_catalog, sc["fashion"])
    sets = write_sets(folder, real_photos(photo_dirs, sc["photos"]), fashion)
    result: dict = {"cores": os.cpu_count(), "batch": BATCH, "sets": {k: len(v) for k, v in sets.items()},
                    "bars": BARS}
    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(all_cpus)})  # one core: per-item costs, as a core of any machine pays them
    try:
        configs: dict[str, Callable[[], float]] = {}
        for name, files in sets.items():
            for side in INPUTS:
                for draft in ((True, False) if name.startswith("jpeg") else (True,)):
                    spec = _spec(side, draft)
                    configs[f"prepare {name} @{side}{'' if draft else ' no-draft'}"] = (
                        lambda files=files, spec=spec: per_item_us(lambda b: load_images(b, spec), files,
                                                                   sc["seconds"]))
            if name == "fashion-png":
                configs[f"pillow loop {name} @64"] = (
                    lambda files=files: per_item_us(pillow_loop(64), files, sc["seconds"]))
            else:
                for side in (*INPUTS, None):
                    for dec, fn in decoders(side).items():
                        if dec != "pillow" and not name.startswith("jpeg") and dec != "opencv":
                            continue  # simplejpeg and PyTurboJPEG read JPEG only
                        configs[f"decode {dec} {name} @{side or 'full'}"] = (
                            lambda files=files, fn=fn: per_item_us(lambda b: [fn(f) for f in b], files, sc["seconds"]))
        result["one_core_us"] = interleaved(configs, sc["rounds"])
        tok = WordTokenizer.build(titles)
        result["stages_one_core"] = {
            "fashion-png @64": stage_breakdown(sets["fashion-png"], _spec(64), titles, tok, sc["seconds"]),
            "jpeg-800 @64": stage_breakdown(sets["jpeg-800"], _spec(64), seconds=sc["seconds"]),
            "jpeg-800 @224": stage_breakdown(sets["jpeg-800"], _spec(224), seconds=sc["seconds"]),
        }
        result["decoder_pixels_equal_pillow"] = {}
        for name in ("jpeg-800", "png-800"):
            for side in (None, 64):
                ref = decoders(side)
                for dec, fn in ref.items():
                    outs = [(fn(f), ref["pillow"](f)) for f in sets[name][:8]]
                    result["decoder_pixels_equal_pillow"][f"{dec} {name} @{side or 'full'}"] = all(
                        a is not None and a.shape == b.shape and np.array_equal(a, b) for a, b in outs) \
                        if all(a is not None for a, _ in outs) else None
    finally:
        os.sched_setaffinity(0, all_cpus)
    result["parity_batch_vs_single"] = {name: parity(files[:BATCH], _spec(64)) for name, files in sets.items()}
    result["thread_scaling"] = {
        f"{name} @{side}": thread_scaling(sets[name], _spec(side), sc["seconds"], max(2, len(all_cpus)))
        for name, side in (("fashion-png", 64), ("jpeg-800", 64), ("jpeg-800", 224))}
    us = result["one_core_us"]
    fashion_us = us["prepare fashion-png @64"]["median"]
    ratio = us["prepare jpeg-800 @64"]["median"] / us["decode pillow jpeg-800 @64"]["median"]
    loop_ratios = [a / b for a, b in zip(us["prepare fashion-png @64"]["runs"], us["pillow loop fashion-png @64"]["runs"])]
    result["checks"] = {"fashion_png_prepare_us": fashion_us,
                        "fashion_png_prepare_ok": fashion_us <= BARS["fashion_png_prepare_us"],
                        # per round, so a slow moment of the machine hits both alike
                        "fashion_png_prepare_vs_pillow_loop": float(np.median(loop_ratios)),
                        "fashion_png_prepare_vs_pillow_loop_range": [min(loop_ratios), max(loop_ratios)],
                        "jpeg800_prepare_vs_draft_decode": ratio,
                        "jpeg800_ok": ratio <= BARS["jpeg800_prepare_vs_draft_decode"],
                        "items_s_per_core": {k.split(" ", 1)[1]: 1e6 / v["median"] for k, v in us.items()
                                             if k.startswith("prepare")}}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--fashion", type=Path, help="fashion-products catalog.csv (default: huse data export)")
    ap.add_argument("--photos", type=Path, action="append", default=[], help="more real photos (JPEG/PNG), any depth")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="huse-prepare-") as tmp:
        res = run(SCALES[a.scale], Path(tmp), a.fashion, a.photos)
    res["scale"] = a.scale
    for k, v in res["one_core_us"].items():
        print(f"{k:45s} {v['median']:9.1f} us/item ({v['range'][0]:.1f}-{v['range'][1]:.1f})")
    for k, v in res["stages_one_core"].items():
        print(f"stages {k}: " + ", ".join(f"{s[:-3]} {x:.1f}" for s, x in v.items()) + " us/item")
    for k, rows in res["thread_scaling"].items():
        print(f"prepare pool {k}: " + ", ".join(f"{r['threads']}T x{r['chunk']} {r['items_s']:.0f}/s "
                                                f"({100 * r['efficiency']:.0f}%)" for r in rows))
    c = res["checks"]
    print(f"bar: fashion PNG prepare {c['fashion_png_prepare_us']:.1f} us/item (<= 45: {c['fashion_png_prepare_ok']}; "
          f"{c['fashion_png_prepare_vs_pillow_loop']:.2f}x the plain Pillow loop); "
          f"800 px JPEG @64 prepare / Pillow draft decode {c['jpeg800_prepare_vs_draft_decode']:.2f} "
          f"(<= 1.3: {c['jpeg800_ok']}); "
          f"batch == single: {all(res['parity_batch_vs_single'].values())}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
