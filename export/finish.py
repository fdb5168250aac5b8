"""Precision variants with accuracy gates, the TensorRT compatibility check, and engines.

Adding to a bundle is atomic: new graphs and engines go into folders the current manifest does
not use (`fp16/`, or `fp16.v2/` when `fp16/` is live), the new manifest replaces the old one in
one rename, and only then are superseded folders deleted. Killed at any point, the folder holds
the old bundle or the new one, plus unlisted leftovers that the next export removes first.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from huse.runtime.bundle import (CPU_ONLY_PRECISIONS, LABELS_METADATA_KEY, is_multi_label, labels_sha256,
                                 load_manifest, write_manifest)
from huse.runtime.classifier import softmax
from huse.runtime.errors import HuseError
from huse.runtime.labels import sigmoid
from huse.runtime.preprocess import ImageSpec
from huse.runtime.tokenizer import load_tokenizer

GRAPHS = ("image", "text", "fused")


def _activation(manifest: dict[str, Any]):
    """Logits -> probabilities of the image and text graphs: a sigmoid per class for multi-label bundles."""
    multi = is_multi_label(manifest)
    return sigmoid if multi and manifest["multilabel"].get("activation", "sigmoid") == "sigmoid" else softmax


def _thresholds(manifest: dict[str, Any], mode: str) -> dict[str, np.ndarray]:
    """accuracy_gate's extra argument for a multi-label bundle: its per-class thresholds of `mode`
    (nothing for single-label bundles, whose gate call stays as it was)."""
    t = manifest.get("multilabel", {}).get("thresholds", {}).get(mode)
    return {} if t is None else {"thresholds": np.asarray(t, dtype=np.float32)}


def _predict(bundle: Path, models: dict[str, dict[str, str]], precision: str, graphs: dict[str, Any], data,
             activation=softmax) -> dict[str, np.ndarray]:
    """Probabilities per mode (image, text, fused) of one precision's graphs on `data`, run as the runtime runs
    them on a CPU (`onnx_files`: an FP16 bundle as the float32 graphs with its weights), and the image graph's
    visual-similarity vectors as "visual" where it has them (from the same run). `models`: the manifest's."""
    from huse.export.api import run_graph_outputs
    from huse.runtime.backends.onnxrt.runner import onnx_files

    out = {}
    for g in GRAPHS:
        names = ["probs"] if g == "fused" else ["logits"] + (["visual"] if "visual" in graphs[g]["outputs"] else [])
        path, weights = onnx_files(models, precision, g)
        res = run_graph_outputs(bundle / path, data.feeds(graphs[g]["inputs"]), names,
                                weights=bundle / weights if weights else None)
        out[g] = res["probs"] if g == "fused" else activation(res["logits"])
        if "visual" in res:
            out["visual"] = res["visual"]
    return out


# INT8 on EfficientNet-Lite0 at 64x64: the early convolutions are where rounding hurts. Measured on
# fashion-products with the default recipe: quantising every Conv gives 87.6% fused top-1 agreement
# (the stem alone in float: 87.2%, no better); the first 10 Convs in float pass (99.6%) at 29.5% of
# the FP32 size. The export walks this ladder and keeps the first rung that passes, so layers stay
# in float only when measurement needs it, and records every attempt in the manifest.
INT8_FLOAT_CONVS = (0, 10, 22, 30)
# MiniLM stays in float in INT8 bundles: quantising its MatMuls (per-tensor activations) cost 8 points
# of fused top-1 agreement on phosphor-icons (91.96%) whatever the image rungs; the image backbone and
# every tower are still quantised. Its FP16 form passes (100% text agreement).
# The word CNN's folded lookups (export/graphs.py FoldedWordCNN) add their Gathers' rows in float: INT8 there
# would only put Q/DQ pairs around three Adds that have no multiply to speed up (int8-cpu quantises Add).
FLOAT_PREFIXES = {"minilm": ("/text_encoder/",), "cnn": ("/text_encoder/Add",)}


def _node_names(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def _exclusions(src: Path, float_convs: int, explicit: tuple[str, ...]) -> list[str]:
    from huse.export.precision import sensitive_nodes

    if explicit:  # names the user gave, for the graphs that have them
        names = _node_names(src)
        return [n for n in explicit if n in names]
    if float_convs == 0:
        return []
    s = sensitive_nodes(src, first_convs=float_convs)
    return s["first_conv"] + s["classifier"]


def stamp_labels(path: Path, labels: list[str]) -> None:
    """Record the label list's sha256 in the graph's ONNX metadata, so that the runtime refuses a
    manifest whose labels were renamed or reordered even when the bundle is not signed."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    digest = labels_sha256(labels)
    if props.get(LABELS_METADATA_KEY) == digest:
        return
    onnx.helper.set_model_props(model, {**props, LABELS_METADATA_KEY: digest})
    onnx.save(model, str(path))


# The folders an export writes into a bundle (`_fresh_folder`: NAME, or NAME.v2 beside a live one).
EXPORT_FOLDERS = {f"{name}{v}" for name in ("fp16", "int8", "int8-cpu", "engines") for v in ("", ".v2")}


def _leftovers(bundle: Path, manifest: dict[str, Any]) -> None:
    """Delete what a killed export left: files in the folders an export writes that the manifest does not
    list, and half-written `*.tmp` files, then those folders if empty. Anything else a user keeps in the
    bundle folder is theirs and stays."""
    keep = set(manifest.get("files", {}))
    for p in sorted(bundle.rglob("*"), reverse=True):  # children before their folders
        rel = p.relative_to(bundle).as_posix()
        ours = rel.split("/")[0] in EXPORT_FOLDERS
        if p.is_symlink() or p.is_file():
            if rel not in keep and (ours or ("/" not in rel and p.name.endswith(".tmp"))):
                p.unlink()
        elif p.is_dir() and ours and not any(p.iterdir()):
            p.rmdir()


def _fresh_folder(bundle: Path, manifest: dict[str, Any], name: str) -> str:
    """`name`, or `name.v2` when the live manifest uses `name`: new files never overwrite live ones."""
    live = {f.split("/")[0] for f in manifest.get("files", {})}
    folder = name if name not in live else f"{name}.v2"
    shutil.rmtree(bundle / folder, ignore_errors=True)
    return folder


def _fp16_variant(bundle: Path, manifest: dict[str, Any], folder: str = "fp16") -> dict[str, Any]:
    from huse.export.precision import convert_fp16

    return {g: convert_fp16(bundle / manifest["models"]["fp32"][g], bundle / folder / f"{g}.onnx") for g in GRAPHS}


def _int8_variant(bundle: Path, manifest: dict[str, Any], opts, calib, evald, ref, say,
                  precision: str = "int8", folder: str | None = None) -> dict[str, Any]:
    """INT8 graphs in `precision`'s folder: "int8" in TensorRT's Q/DQ form, "int8-cpu" for onnxruntime's CPU
    kernels; either walks the float-convs ladder and keeps the first rung that passes the fused gate."""
    folder = folder or precision
    # One calibration per graph, not one per rung: the ranges do not depend on which convs stay in float.
    with tempfile.TemporaryDirectory(prefix=f"huse-{precision}-ranges-") as ranges:
        return _int8_ladder(bundle, manifest, opts, calib, evald, ref, say, precision, folder, Path(ranges))


def _int8_ladder(bundle: Path, manifest: dict[str, Any], opts, calib, evald, ref, say, precision: str, folder: str,
                 ranges: Path) -> dict[str, Any]:
    from huse.export.precision import accuracy_gate, quantize_int8, quantize_int8_cpu

    def quantize(g: str, float_convs: int) -> dict[str, Any]:
        src = bundle / manifest["models"]["fp32"][g]
        dst, feeds = bundle / folder / f"{g}.onnx", calib.feeds(manifest["graphs"][g]["inputs"], batch=64)
        exclude = _exclusions(src, float_convs, opts.int8_exclude)
        prefixes = FLOAT_PREFIXES.get(manifest.get("model", {}).get("text_encoder"), ())
        exclude += sorted(n for n in _node_names(src) if n.startswith(prefixes)) if prefixes else []
        if precision == "int8-cpu":
            return quantize_int8_cpu(src, dst, feeds, method=opts.calib_method, exclude_nodes=exclude,
                                     ranges=ranges / f"{g}.json")
        return quantize_int8(src, dst, feeds, method=opts.calib_method, exclude_nodes=exclude, quantizer=opts.quantizer,
                             ranges=ranges / f"{g}.json")

    if opts.int8_exclude:  # names the user gave: each must be a node of one of the graphs
        known = set().union(*(_node_names(bundle / manifest["models"]["fp32"][g]) for g in GRAPHS))
        unknown = [n for n in opts.int8_exclude if n not in known]
        if unknown:
            convs = sorted(n for n in known if "conv" in n.lower())[:3]
            raise HuseError(f"--int8-exclude {unknown[0]!r} is not a node of the bundle's graphs; names are exact, "
                            f"e.g. {convs} (a bundle's fused.onnx lists them all: onnx.load(PATH).graph.node)")
    ladder = (0,) if opts.int8_exclude else INT8_FLOAT_CONVS
    attempts = []
    for k in ladder:
        quantize("fused", k)
        probs = run_graph_probs(bundle / folder / "fused.onnx", manifest["graphs"]["fused"]["inputs"], evald, "fused")
        gate = accuracy_gate(ref["fused"], probs, evald.labels, precision=precision, **_thresholds(manifest, "fused"))
        attempts.append({"float_convs": k, "agreement": gate["agreement"], "drop_points": gate["drop_points"],
                         "passed": bool(gate["passed"])})
        say(f"  {precision} with the first {k} convs in float: fused agreement {gate['agreement']:.2f}%, "
            f"drop {gate['drop_points']:+.2f} pts -> {'pass' if gate['passed'] else 'fail'}")
        if gate["passed"]:
            break
    info = {g: quantize(g, k) for g in ("image", "text")}
    info["fused"] = {"float_convs": k, "attempts": attempts}
    return info


def single_mode_notes(precision: str, gates: dict[str, dict[str, Any]]) -> list[str]:
    """A note for each single mode (image, text) that loses more than the INT8 drop bar at `precision`: the gate
    reads the fused answer, and items with only a photo or only a title run those graphs alone."""
    from huse.export.precision import INT8_MAX_DROP

    return [f"note: {precision} {mode}-only {gates[mode].get('metric', 'top-1')} is {gates[mode]['drop_points']:.2f} "
            f"points below fp32's (more than the {INT8_MAX_DROP}-point INT8 bar; the gate reads the fused answer): "
            f"items classified by {'photo' if mode == 'image' else 'title'} alone lose that at this precision; "
            "fp32 keeps them" for mode in ("image", "text") if gates[mode]["drop_points"] > INT8_MAX_DROP]


def run_graph_probs(path: Path, inputs: list[str], data, graph: str) -> np.ndarray:
    from huse.export.api import run_graph

    feeds = data.feeds(inputs)
    return run_graph(path, feeds, "probs") if graph == "fused" else softmax(run_graph(path, feeds, "logits"))


def finish_bundle(bundle: Path, manifest: dict[str, Any], opts) -> dict[str, Any]:
    """Add the requested precisions (gated), check TensorRT compatibility, build engines, rewrite the manifest."""
    from huse.export.api import EvalData
    from huse.export.precision import accuracy_gate, visual_agreement
    from huse.train.data import load_source

    say = opts.say
    _leftovers(bundle, manifest)
    superseded: set[str] = set()  # folders the new manifest stops using: deleted once it is in place
    wanted = [p for p, on in (("fp16", opts.fp16), ("int8", opts.int8), ("int8-cpu", opts.int8_cpu)) if on]
    if wanted:
        spec = ImageSpec.from_dict(manifest["preprocessing"])
        tokenizer = load_tokenizer(manifest["tokenizer"], bundle)
        multi = is_multi_label(manifest)
        ds = load_source(manifest["data"])
        evald = EvalData(ds, "test", opts.eval_size, spec, tokenizer, manifest["labels"], multi=multi)
        calib = EvalData(ds, "train", opts.calib_size, spec, tokenizer, manifest["labels"], multi=multi) if {"int8", "int8-cpu"} & set(wanted) else None
        say(f"accuracy gate on {len(evald)} held-out {evald.split} items"
            + (f"; INT8 calibration on {len(calib)} train items ({opts.calib_method or 'percentile'})" if calib else ""))
        ref = _predict(bundle, manifest["models"], "fp32", manifest["graphs"], evald, _activation(manifest))
        fp32_size = sum((bundle / f).stat().st_size for f in manifest["models"]["fp32"].values())
        manifest.setdefault("accuracy", {})
        for precision in wanted:
            folder = _fresh_folder(bundle, manifest, precision)
            info = (_fp16_variant(bundle, manifest, folder) if precision == "fp16"
                    else _int8_variant(bundle, manifest, opts, calib, evald, ref, say, precision, folder))
            models = {g: f"{folder}/{g}.onnx" for g in GRAPHS}
            for f in models.values():
                stamp_labels(bundle / f, manifest["labels"])
            cand = _predict(bundle, dict(manifest["models"], **{precision: models}), precision, manifest["graphs"],
                            evald, _activation(manifest))
            gates = {mode: accuracy_gate(ref[mode], cand[mode], evald.labels, precision=precision,
                                         **_thresholds(manifest, mode)) for mode in GRAPHS}
            size = sum((bundle / f).stat().st_size for f in models.values())
            for mode in GRAPHS:
                gt = gates[mode]
                say(f"  {precision} {mode:6}: {gt.get('metric', 'top-1')} {gt['cand_accuracy']:.2f}% vs fp32 {gt['ref_accuracy']:.2f}% "
                    f"(drop {gt['drop_points']:+.2f} pts), agreement {gt['agreement']:.2f}%")
            for line in single_mode_notes(precision, gates):
                say(f"  {line}")
            visual = visual_agreement(ref["visual"], cand["visual"]) if "visual" in ref else None
            if visual is not None:
                say(f"  {precision} visual: cosine to fp32 min {visual['min_cosine']:.4f} mean {visual['mean_cosine']:.4f}, "
                    f"nearest other photo unchanged for {visual['nn_agreement']:.2f}%")
            say(f"  {precision} size: {size / 1e6:.1f} MB = {100 * size / fp32_size:.1f}% of fp32")
            gate = gates["fused"]
            if not gate["passed"]:
                if opts.accuracy_gate:
                    shutil.rmtree(bundle / folder, ignore_errors=True)
                    raise HuseError(f"{precision} accuracy gate failed (fused mode): {gate['message']}; nothing "
                                    "was written (a failed gate keeps nothing: no new bundle, an existing one "
                                    f"unchanged). Export without --{precision} for the other precisions, or "
                                    f"`huse-export ... --{precision} --no-accuracy-gate` keeps it anyway")
                say(f"  WARNING: {precision} accuracy gate failed and was overridden: {gate['message']}")
            superseded |= {f.split("/")[0] for f in manifest["models"].get(precision, {}).values()}
            manifest["models"][precision] = models
            manifest["accuracy"][precision] = {
                "gate": "fused", "passed": bool(gate["passed"]), "split": evald.split, "n": len(evald),
                "size_ratio_vs_fp32": size / fp32_size,
                "modes": {m: {k: gates[m][k] for k in ("agreement", "ref_accuracy", "cand_accuracy", "drop_points", "passed")}
                          for m in GRAPHS},
                **({"visual": visual} if visual is not None else {}),
                # without the quantizers' `path`: the folder they wrote in (a new bundle's OUT.partial) is gone once
                # published, and the graphs' files are `models` above, relative to the bundle wherever it moves
                "conversion": {g: _jsonable({k: v for k, v in i.items() if k != "path"}) for g, i in info.items()},
            }
    manifest["trt_compat"] = _check_compat(bundle, manifest, say)
    old_engines = {e["file"].split("/")[0] for e in manifest.get("engines", [])}
    manifest["engines"] = _engines(bundle, manifest, opts)
    if old_engines - {e["file"].split("/")[0] for e in manifest["engines"]}:
        superseded |= old_engines
    live = {f.split("/")[0] for p in manifest["models"].values() for f in p.values()}
    superseded -= live | {e["file"].split("/")[0] for e in manifest["engines"]} | {manifest["tokenizer"]["vocab_file"]}
    manifest.pop("files", None)
    for key in ("format", "format_version"):
        manifest.pop(key, None)
    write_manifest(bundle, manifest, exclude=sorted(superseded), sign_key=getattr(opts, "sign", None))
    for name in superseded:  # the new manifest is in place: the old folders are unreferenced
        shutil.rmtree(bundle / name, ignore_errors=True)
    return load_manifest(bundle)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _check_compat(bundle: Path, manifest: dict[str, Any], say) -> dict[str, Any]:
    from huse.export.trt_compat import assert_trt_compat

    checked = []
    for precision, models in manifest["models"].items():
        if precision in CPU_ONLY_PRECISIONS:  # written for onnxruntime's CPU kernels, never built by TensorRT
            continue
        for g, f in models.items():
            assert_trt_compat(bundle / f)
            checked.append(f)
    say(f"TensorRT compatibility (static check, TensorRT 10 and 11 operator sets): {len(checked)} graphs pass")
    return {"tensorrt_versions": ["10", "11"], "checked": checked, "passed": True}


def _engines(bundle: Path, manifest: dict[str, Any], opts) -> list[dict[str, Any]]:
    from huse.runtime.backends.trt.loader import (DEFAULT_BATCH, DEFAULT_WORKSPACE_MIB, DLA_PRECISIONS, build_engine,
                                                  dla_batch, engine_support, token_range)

    if opts.engine == "skip":
        return manifest.get("engines", [])
    ok, reason = engine_support()
    if not ok:
        if opts.engine == "require":
            raise HuseError(f"TensorRT engines were required (--engine require) but cannot be built here: {reason}")
        opts.say(f"TensorRT engines skipped: {reason}. The ONNX files are complete; build engines on the target "
                 "with `huse-export BUNDLE --engine require` (or let the runtime build them on first use)")
        return manifest.get("engines", [])
    engines = []
    name = _fresh_folder(bundle, manifest, "engines")
    folder = bundle / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in {e["file"].split("/")[0] for e in manifest.get("engines", [])}:  # reuse the timing cache
        if (bundle / old / "timing.cache").is_file():
            shutil.copy(bundle / old / "timing.cache", folder / "timing.cache")
    for precision, models in manifest["models"].items():
        if precision in CPU_ONLY_PRECISIONS:
            continue
        # DLA runs FP16/INT8 only (export.api refused a DLA export without either): FP32 stays on the GPU.
        dla = opts.dla_core if precision in DLA_PRECISIONS else None
        batch = dla_batch(opts.batch) if dla is not None else opts.batch or DEFAULT_BATCH
        for g, f in models.items():
            entry = build_engine(bundle / f, folder / f"{precision}-{g}.engine", batch=batch,
                                 workspace_mib=opts.workspace_mib or DEFAULT_WORKSPACE_MIB,
                                 timing_cache=folder / "timing.cache", dla_core=dla, precision=precision,
                                 tokens=token_range(manifest))
            entry.update(file=f"{name}/{precision}-{g}.engine", graph=g)
            engines.append(entry)
            where = "" if dla is None else (f", DLA core {dla}: {entry['dla_layers']} layers on the DLA, "
                                            f"{entry['gpu_layers']} on the GPU")
            opts.say(f"  engine {entry['file']}: TensorRT {entry['tensorrt_version']} on {entry['gpu_name']}{where}")
    return engines
