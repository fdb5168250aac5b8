"""`huse-export`: a run (or an existing bundle) -> a verified, self-describing bundle.

1. fp32 graphs (image, text, fused) exported from the torch model, each compared with torch
   on real test inputs through Polygraphy, every output of each (image: embedding, logits and
   the visual-similarity vector; max abs difference <= 1e-4 of the output's scale, else refused);
2. optional fp16 / int8 variants, each passing an accuracy gate on held-out products;
3. a static TensorRT-compatibility check of every graph;
4. TensorRT engines where TensorRT and a GPU are usable (skipped with the reason elsewhere);
5. manifest.json with labels, hierarchy, preprocessing, tokenizer, fusion weight, accuracy,
   tool versions and the sha256 of every file (signed with Ed25519 by `sign`).

Nothing half-made is ever left under the bundle's name: a new bundle (from a run, or a copy to
another --out) is built in OUT.partial and renamed into place when complete, so a failed gate or
a kill leaves no bundle; precisions added to an existing bundle replace its manifest last
(export/finish.py), so it stays valid until then.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from huse.runtime.bundle import FORMAT as BUNDLE_FORMAT
from huse.runtime.bundle import MANIFEST, is_multi_label, load_manifest, package_versions, write_manifest
from huse.runtime.files import check_replaceable
from huse.runtime.errors import HuseError, check_ranges
from huse.runtime.preprocess import ImageSpec, load_image
from huse.runtime.tokenizer import load_tokenizer, normalise_title

GRAPHS = ("image", "text", "fused")
PARITY_ATOL = 1e-4
# MiniLM batches are padded to their longest title exactly (rounded up to a multiple of this). The graph
# removes the padding before its row-wise ops (MiniLM.without_padding), so the width only sizes the
# attention and the Gathers around it: on phosphor-icons' first held-out batch of 64, 1 intra-op thread,
# the text graph at the exact width (6) took 0.97x its time at the width rounded up to 8. Bundles exported
# before kept 8 (fewer distinct shapes, when padding rows were computed in full); their spec says so.
PAD_MULTIPLE = 1


@dataclass
class ExportOptions:
    fp16: bool = False
    int8: bool = False
    int8_cpu: bool = False  # INT8 for onnxruntime's CPU kernels (uint8 activations); not for TensorRT
    calib_size: int = 512  # training-split items (rows) used to calibrate INT8
    calib_method: str | None = None  # None: percentile, which measured best here (export/precision.py)
    int8_exclude: tuple[str, ...] = ()
    quantizer: str = "ort"
    accuracy_gate: bool = True
    eval_size: int = 2000  # held-out items (rows) the accuracy gates run on (0: the whole split)
    engine: str = "auto"  # auto: build where possible; require: fail without; skip
    batch: tuple[int, int, int] | None = None  # TensorRT profile (min, opt, max); None: 1:8:64 (8:8:8 on DLA)
    workspace_mib: int | None = None
    dla_core: int | None = None  # FP16/INT8 engines on this DLA core, fixed batch; FP32 stays on the GPU
    force: bool = False
    sign: str | Path | None = None  # Ed25519 private key (PEM) to sign manifest.json with
    parity_atol: float = PARITY_ATOL
    say: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self):
        check_ranges(self, {"calib_size": (1, True), "eval_size": (0, True), "workspace_mib": (1, True)})
        if self.batch is not None and not 1 <= self.batch[0] <= self.batch[1] <= self.batch[2]:
            raise HuseError(f"--batch {':'.join(map(str, self.batch))} is not a TensorRT profile; MIN:OPT:MAX needs "
                            "1 <= MIN <= OPT <= MAX, e.g. 1:8:64")


# ----------------------------------------------------------------------------------------
# Real inputs from the run's data, through the runtime's own preprocessing and tokenizer


class EvalData:
    """Real products of one split, preprocessed exactly as the runtime does.

    Args:
        source: the data source recorded in the run / bundle, or its Dataset already loaded (`load_source`: one
            load for several splits; fashion-products takes ~2 s each time).
        split: "train", "val" or "test".
        n: at most this many items (rows; a seeded choice; 0 or None: all).
        spec, tokenizer: the bundle's preprocessing and tokenizer.
        labels: the bundle's labels (class index order).
        multi: a multi-label bundle: `labels` becomes the (n, C) multi-hot label sets.
    """

    def __init__(self, source, split: str, n: int | None, spec: ImageSpec, tokenizer, labels: list[str],
                 multi: bool = False):
        from huse.train.data import load_source

        ds = load_source(source) if isinstance(source, dict) else source
        self.split, idx = ds.heldout(split, n)
        self.images = np.stack([load_image(ds.images[i], spec) for i in idx])
        self.text = tokenizer.inputs([normalise_title(ds.titles[i]) or "" for i in idx])
        if multi:
            from huse.train.multilabel import multi_hot

            self.labels = multi_hot([ds.classes[i] for i in idx], labels)
        else:
            self.labels = np.asarray([labels.index(ds.classes[i]) for i in idx])

    def __len__(self) -> int:
        return len(self.labels)

    def feeds(self, inputs: list[str], batch: int = 64) -> list[dict[str, np.ndarray]]:
        arrays = {"image": self.images, **self.text}
        return [{k: arrays[k][s:s + batch] for k in inputs} for s in range(0, len(self), batch)]


def run_graph(path: Path, feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    return run_graph_outputs(path, feeds, [output])[output]


def run_graph_outputs(path: Path, feeds: list[dict[str, np.ndarray]], outputs: list[str],
                      weights: Path | None = None) -> dict[str, np.ndarray]:
    """Several outputs of one graph over all feeds, in one pass (`weights`: as `OnnxrtRunner`'s)."""
    from huse.runtime.backends.onnxrt.runner import OnnxrtRunner

    with OnnxrtRunner(path, weights=weights) as r:
        parts = [r.infer(f) for f in feeds]
    return {o: np.concatenate([p[o] for p in parts]) for o in outputs}


# ----------------------------------------------------------------------------------------
# fp32 bundle from a training run


def export_fp32(run: Path, tmp: Path, opts: ExportOptions) -> dict[str, Any]:
    """Export the run's model into the new bundle directory `tmp` (the caller renames it into place)."""
    from huse.export.finish import stamp_labels
    from huse.export.graphs import (VISUAL_FIT_PHOTOS, check_parity, export_onnx, fit_visual_whitening, graph_specs,
                                    optimize_onnx)
    from huse.train.data import load_source
    from huse.train.trainer import load_run

    model, cfg = load_run(run)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = ImageSpec.from_dict(cfg["preprocessing"])
    tok_spec = cfg["tokenizer"]
    shutil.copy(run / tok_spec["vocab_file"], tmp / tok_spec["vocab_file"])
    tokenizer = load_tokenizer(tok_spec, tmp)  # the run's fixed padding: parity and gates at the full length
    # MiniLM graphs take any length and the bundle pads a batch to its longest title (a phosphor-icons batch
    # of 64 is 8 tokens wide, not 32); the word CNN's graph keeps its fixed length (its folded convolution).
    dynamic_length = tok_spec["type"] == "wordpiece"
    if dynamic_length:
        tok_spec = dict(tok_spec, pad="longest", pad_multiple=PAD_MULTIPLE)
    weight = cfg["fusion"]["image_weight"]
    multi = bool(cfg["model"].get("multi_label"))
    ds = load_source(cfg["data"])
    data = EvalData(ds, "test", 64, spec, tokenizer, cfg["labels"], multi=multi)
    split = data.split
    photos = EvalData(ds, "train", VISUAL_FIT_PHOTOS, spec, tokenizer, cfg["labels"], multi=multi)
    whitening = fit_visual_whitening(model, photos.images)
    visual_dim = int(whitening.projection.shape[1])
    opts.say(f"  visual vector: PCA-whitened to {visual_dim} dims, fitted on {len(photos)} {photos.split} photos")
    specs = graph_specs(model, weight, whitening)
    # Titles padded as the bundle pads them (a batch's longest), checked beside the full length.
    short = EvalData(ds, "test", 64, spec, load_tokenizer(tok_spec, tmp), cfg["labels"], multi=multi) \
        if dynamic_length else None
    parity = {}
    for name, g in specs.items():
        path = tmp / f"{name}.onnx"
        feeds = data.feeds(g["inputs"], batch=32)
        feeds.append({k: v[:7] for k, v in feeds[0].items()})  # an odd batch proves the dynamic axis
        if short is not None and name != "image":
            feeds += short.feeds(g["inputs"], batch=32)
        export_onnx(g["export"], feeds[0], g["inputs"], g["outputs"], path, dynamic_length=dynamic_length)
        optimize_onnx(path)  # the graph that is verified is the graph that ships
        stamp_labels(path, cfg["labels"])
        parity[name] = check_parity(g["module"], path, feeds, g["inputs"], g["outputs"], opts.parity_atol)
        opts.say(f"  {name}.onnx: max |onnxruntime - torch| = "
                 + ", ".join(f"{o} {c['max_abs_diff']:.2e} (limit {c['limit']:.2g})" for o, c in parity[name].items())
                 + f" on {len(data)} real {split} items")
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    fitted_on = _fitted_on(metrics)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labels": cfg["labels"],
        "hierarchy": {"separator": "<", "depth": max(len(l.split("<")) for l in cfg["labels"])},
        "embedding_dim": model.cfg.embed_dim,
        # Width of image.onnx's `visual` output (the whitened backbone features, export/graphs.py); bundles
        # without it predate visual vectors and the runtime asks for a re-export when one is wanted.
        "visual_dim": visual_dim,
        "visual": {"features": int(model.feature_norm.mean.numel()), "dims": visual_dim,
                   "whitening": "PCA, 1 / sqrt(variance + mean variance)",
                   "fitted_on": f"{len(photos)} {photos.split} photos"},
        "preprocessing": spec.to_dict(),
        "tokenizer": tok_spec,
        "fusion": {"image_weight": weight, "rule": "w * softmax(image logits) + (1 - w) * softmax(text logits)"},
        # Temperatures fitted by the training run (on val, or on its folds); runs from before calibration get 1 (none).
        "calibration": {"temperature": cfg.get("calibration", {}).get("temperature", {m: 1.0 for m in GRAPHS}),
                        "rule": "p -> p^(1/T) renormalised, per mode (image/text: softmax(logits / T))",
                        **({} if multi else {"fitted_on": fitted_on})},
        "models": {"fp32": {g: f"{g}.onnx" for g in GRAPHS}},
        "graphs": {g: {"inputs": s["inputs"], "outputs": s["outputs"]} for g, s in specs.items()},
        "parity": {"reference": "torch eager", "atol": opts.parity_atol,
                   "rule": "max |onnxruntime - torch| <= atol x max(1, max |torch output|), per output",
                   "max_abs_diff": {g: max(c["max_abs_diff"] for c in d.values()) for g, d in parity.items()},
                   "per_output": {g: {o: c["max_abs_diff"] for o, c in d.items()} for g, d in parity.items()},
                   "limits": {g: {o: c["limit"] for o, c in d.items()} for g, d in parity.items()}},
        "model": {k: cfg["model"][k] for k in ("backbone", "image_size", "text_encoder", "embed_dim")},
        "metrics": _run_metrics(metrics),
        "data": cfg["data"],
        "source_run": str(run.resolve()),  # the torch model, for benchmarks' PyTorch baseline
        "engines": [],
        **(_multilabel_manifest(cfg, fitted_on) if multi else {}),
        "versions": package_versions("huse-edge", "torch", "onnx", "onnxruntime", "polygraphy",
                                     "onnxconverter-common", "numpy", "tensorrt"),
    }
    write_manifest(tmp, manifest)
    return load_manifest(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished bundle `tmp` in place at `out`, replacing an old one only now.

    The old and new folders are swapped atomically where the kernel can (so `out` always holds
    a complete bundle); elsewhere there is a moment between two renames when `out` is absent
    and the old bundle sits at OUT.old-PID."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old bundle
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _check_dla(src: Path, opts: ExportOptions) -> None:
    """Refuse a DLA request DLA cannot run, before anything is exported or built (the loader's rule)."""
    from huse.runtime.backends.trt.loader import check_dla

    if opts.dla_core is None:
        return
    existing = set(load_manifest(src)["models"]) if (src / MANIFEST).is_file() else set()
    asked = existing | {p for p, on in (("fp32", True), ("fp16", opts.fp16), ("int8", opts.int8)) if on}
    batch = check_dla(opts.dla_core, asked, opts.batch)
    if opts.batch is None:
        opts.say(f"DLA core {opts.dla_core}: FP16/INT8 engines for a fixed batch of {batch[0]} (DLA has no "
                 "dynamic shapes; choose with --batch N:N:N); FP32 engines stay on the GPU with 1:8:64")


def _run_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The run's val and test figures per mode (its metrics.json; {} for a run without one)."""
    if not m:
        return {}
    key = "micro_f1" if is_multi_label(m) else "top1"
    return {s: {mode: r[key] for mode, r in m[s].items()} for s in ("val", "test") if s in m}


def _fitted_on(m: dict[str, Any]) -> str:
    """What the run (its metrics.json) tuned the shipped temperatures (multi-label: thresholds) on, for `huse info`:
    val, or with k-fold cross-validation (the default below 5,000 train + val rows) the folds' pooled out-of-fold
    predictions."""
    folds = (m.get("cv") or {}).get("folds", 0)
    return f"the out-of-fold predictions of {folds} folds of train + val" if folds else "val"


def _multilabel_manifest(cfg: dict[str, Any], tuned_on: str) -> dict[str, Any]:
    """What a multi-label bundle's manifest adds (runtime/labels.py reads it): the task, the head's
    activation, the per-class thresholds per mode and what they were tuned on, and the fusion rule."""
    act = cfg["model"].get("label_head", "sigmoid")
    return {"task": "multi-label",
            "multilabel": {"thresholds": cfg["thresholds"], "tuned_on": tuned_on, "path_separator": "|", "activation": act,
                           "rule": "every class with probability >= its threshold; none: the best class alone"},
            "fusion": {"image_weight": cfg["fusion"]["image_weight"],
                       "rule": f"w * {act}(image logits) + (1 - w) * {act}(text logits)"}}


# ----------------------------------------------------------------------------------------
# Entry point


def export(src: str | Path, out: str | Path | None = None, opts: ExportOptions | None = None) -> dict[str, Any]:
    """Export a run to a bundle, or add precisions/engines to an existing bundle.

    Args:
        src: a training run directory or a bundle directory.
        out: the bundle directory (default: src itself when src is a bundle).
        opts: what to produce.
    Returns:
        The final manifest.
    Raises:
        HuseError: parity, accuracy gate, compatibility or engine failures, with the figures.
    """
    from huse.export.finish import finish_bundle

    opts = opts or ExportOptions()
    src = Path(src)
    if opts.sign is not None:  # a bad key fails now, not after minutes of export
        from huse.runtime.signing import check_signing_key

        check_signing_key(opts.sign)
    _check_dla(src, opts)  # a DLA request DLA cannot run fails now, before any export or build
    if (src / MANIFEST).is_file():
        bundle = Path(out) if out else src
        if bundle.resolve() == src.resolve():  # in place: atomic, the manifest is replaced last
            return finish_bundle(src, load_manifest(src), opts)
        if bundle.exists() and not opts.force:
            raise HuseError(f"{bundle} exists; pass --force to replace it")
        check_replaceable(bundle, BUNDLE_FORMAT, "huse bundle", "--force")
        tmp = bundle.with_name(bundle.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        load_manifest(src)  # copy only a bundle that verifies
        shutil.copytree(src, tmp)
        manifest = load_manifest(tmp)
    else:
        if out is None:
            raise HuseError("exporting a run needs --out BUNDLE_DIR")
        bundle = Path(out)
        if bundle.exists() and not opts.force:
            raise HuseError(f"{bundle} exists; pass --force to replace it, or export into a new folder")
        check_replaceable(bundle, BUNDLE_FORMAT, "huse bundle", "--force")
        opts.say(f"exporting {src} -> {bundle}")
        tmp = bundle.with_name(bundle.name + ".partial")
        manifest = export_fp32(src, tmp, opts)
    try:
        finish_bundle(tmp, manifest, opts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed gate keeps nothing
        raise
    _publish(tmp, bundle)
    return load_manifest(bundle)
