"""`huse-bench BUNDLE`: latency, throughput, memory and accuracy across backends, precisions,
batch sizes and modes, with the PyTorch eager model measured side by side in the same process.

Every configuration is timed in `repeats` interleaved rounds (round r of every configuration
runs before round r+1 of any), so slow drift of a noisy machine spreads over all of them
instead of biasing whichever ran last; the spread of the per-round medians is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from huse.benchmarks import stats
from huse.benchmarks.compare import SCHEMA
from huse.benchmarks.machine import gpu_matmul_peak_flops, machine_info, matmul_peak_flops
from huse.runtime.backends import gpu_backends
from huse.runtime.backends.base import BaseRunner
from huse.runtime.bundle import CPU_ONLY_PRECISIONS, is_multi_label, load_manifest
from huse.runtime.classifier import Classifier
from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import load_tokenizer, normalise_title

MODES = ("image", "text", "fused")


@dataclass
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32, 128)
    modes: tuple[str, ...] = MODES
    precisions: tuple[str, ...] | None = None  # None: every precision in the bundle
    kinds: tuple[str, ...] = ("model", "e2e")
    repeats: int = 3
    seconds: float = 0.5  # time budget of one configuration in one round
    headline_batch: int = 64  # the e2e fused comparison with PyTorch the README reports
    headline_repeats: int = 7
    eval_size: int = 1000  # held-out products for accuracy per configuration
    concurrency: tuple[int, ...] = (1, 2, 4)
    threads: int | None = None
    torch_baseline: bool = True
    torch_compile: bool = False  # minutes of compilation on 2 cores; opt in
    cold_start: bool = True
    shared_threads: bool = False  # every onnxruntime session on one pool (huse.runtime.share_threads)
    run: str | None = None  # training run for the torch baseline (default: the bundle's source run)
    progress: bool = True


# ----------------------------------------------------------------------------------------
# Baseline: the same Classifier pipeline with the torch model where the ONNX graphs were


class _TorchGraph(BaseRunner):
    """A runner over one torch graph module (the runtime's runner contract and lifetime).
    On CUDA the copy to the GPU and back is part of each call, as it is for the GPU runtimes."""

    name = "torch"

    def __init__(self, path: Path, module, inputs: list[str], outputs: list[str], device: str = "cpu"):
        super().__init__(path)
        self.module, self.inputs, self.outputs, self.device = module.eval(), inputs, outputs, device

    def activate_impl(self) -> None:
        pass  # the module is built and on its device already

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(feed[n]).to(self.device) for n in self.inputs))
            return {n: t.cpu().numpy() for n, t in zip(self.outputs, out)}  # .cpu() waits for the GPU


def torch_cuda_status() -> tuple[bool, str]:
    """Whether the PyTorch baseline can also run on a GPU here (a CUDA build of torch and a GPU)."""
    try:
        from huse.train.trainer import cuda_status
    except ImportError as e:
        return False, f"torch is not importable ({e})"
    return cuda_status()


class TorchClassifier(Classifier):
    """The PyTorch eager baseline: identical decode, preprocessing, tokeniser and postprocessing;
    only the model call differs. `compile=True` wraps each graph in torch.compile; `device="cuda"`
    is the baseline for the GPU backends (same device, same inputs).

    Titles of a MiniLM bundle (tokenizer "pad": "longest") are padded as a Hugging Face user pads them
    by default (`tokenizer(titles, padding=True)`, sentence-transformers' `encode`): to the batch's
    longest title exactly, not rounded up to the bundle's `pad_multiple` (the runtime's choice, for
    fewer distinct shapes), so the baseline does no padding work it would not do on its own."""

    def __init__(self, bundle: Path, run: Path, compile: bool = False, threads: int | None = None,
                 device: str = "cpu", **kw):
        import torch

        from huse.export.graphs import graph_specs
        from huse.train.trainer import load_run

        super().__init__(bundle, backend="onnxruntime", **kw)
        if self.manifest["tokenizer"].get("pad") == "longest":
            self.tokenizer = load_tokenizer(dict(self.manifest["tokenizer"], pad_multiple=1), self.bundle)
        if threads:
            torch.set_num_threads(threads)
        model, cfg = load_run(run)
        model.to(device)
        self.backend, self.device = "torch", device
        for name, g in graph_specs(model, self.fusion_weight).items():
            module = torch.compile(g["module"]) if compile else g["module"]
            self._runners[name] = _TorchGraph(Path(run) / "model.safetensors", module, g["inputs"], g["outputs"], device)
            self._runners[name].activate()


# ----------------------------------------------------------------------------------------
# Inputs


def heldout_titles(bundle: str | Path, manifest: dict[str, Any], catalog: str | None = None, n: int = 1000):
    """A bundle's held-out test titles, normalised, with their class indices and the bundle's tokenizer.

    Args:
        bundle: the bundle folder.
        manifest: its manifest.
        catalog: the training catalog where it lies on this machine, if not where the manifest says
            (its split is recomputed).
        n: how many test products at most.
    Returns:
        (tokenizer, titles, class index per title)
    """
    from huse.train.data import load_source

    with Classifier(bundle) as clf:
        tokenizer, labels = clf.tokenizer, clf.labels
    ds = load_source(dict(manifest["data"], catalog=catalog) if catalog else manifest["data"])
    _, idx = ds.heldout("test", n)
    titles = [normalise_title(ds.titles[i]) or "" for i in idx]
    return tokenizer, titles, np.asarray([labels.index(ds.classes[i]) for i in idx])


class BenchData:
    """Held-out products as PNG files on disk (for e2e) and as ready arrays (for model-only)."""

    def __init__(self, manifest: dict[str, Any], clf: Classifier, n: int, folder: Path):
        if is_multi_label(manifest):  # top-1 against one class per product means nothing there
            raise HuseError("huse-bench measures top-1 of single-label bundles; for a multi-label bundle run "
                            "`python -m huse.benchmarks.multilabel` (micro-F1, mAP through the runtime)")
        from PIL import Image

        from huse.train.data import load_source

        ds = load_source(manifest["data"])
        _, idx = ds.heldout("test", n)
        self.paths, self.titles = [], []
        for i in idx:
            img = ds.images[i]
            if isinstance(img, np.ndarray):
                path = folder / f"{i}.png"
                Image.fromarray(img).save(path)
                img = str(path)
            self.paths.append(img)
            self.titles.append(ds.titles[i])
        self.labels = np.asarray([manifest["labels"].index(ds.classes[i]) for i in idx])
        self.arrays = clf.preprocess_images(self.paths)
        self.tokenizer = clf.tokenizer

    def take(self, start: int, batch: int, tokenizer=None) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
        """`batch` products from `start` (wrapping): paths, titles, and the graph feeds of exactly these,
        titles tokenised as a batch (a MiniLM bundle pads them to this batch's longest, as classify does)
        by `tokenizer` (a classifier's own; None: the bundle's)."""
        sel = [(start + k) % len(self.paths) for k in range(batch)]
        titles = [self.titles[s] for s in sel]
        tokenizer = tokenizer or self.tokenizer
        feeds = {"image": self.arrays[sel], **tokenizer.inputs([normalise_title(t) or "" for t in titles])}
        return [self.paths[s] for s in sel], titles, feeds


def _call(clf: Classifier, kind: str, mode: str, data: BenchData, batch: int) -> Callable[[], object]:
    paths, titles, feeds = data.take(0, batch, clf.tokenizer)
    if kind == "e2e":
        images = paths if mode in ("image", "fused") else None
        texts = titles if mode in ("text", "fused") else None
        return lambda: clf.classify(images=images, titles=texts, mode=mode)
    inputs = clf.manifest["graphs"][mode]["inputs"]
    feed = {k: feeds[k] for k in inputs}
    clf.run_graph(mode, feed)  # load the runner outside the timed calls
    return lambda: clf.run_graph(mode, feed)


# ----------------------------------------------------------------------------------------
# The suite


def _classifiers(bundle: Path, manifest: dict[str, Any], cfg: BenchConfig) -> tuple[dict[tuple[str, str], Classifier], list[dict]]:
    """One Classifier per available (backend, precision); unavailable ones become skipped rows."""
    out, skipped = {}, []
    batch_size = max(max(cfg.batches), cfg.headline_batch)
    precisions = cfg.precisions or tuple(sorted(manifest["models"]))
    # (row label, backend, device); the labels of the GPU ones are gpu_backends()'s keys.
    backends = [("onnxruntime", "onnxruntime", "cpu")]
    for label, (usable, reason) in gpu_backends().items():
        if usable:
            backends.append((label, "tensorrt" if label == "tensorrt" else "onnxruntime", "cuda"))
        else:
            skipped.append({"backend": label, "reason": reason})
    for label, backend, device in backends:
        for p in precisions:
            if p not in manifest["models"]:
                skipped.append({"backend": label, "precision": p, "reason": f"bundle has no {p} models"})
                continue
            if p in CPU_ONLY_PRECISIONS and device != "cpu":
                continue  # its graphs are for onnxruntime's CPU kernels only
            out[(label, p)] = Classifier(bundle, backend=backend, precision=p, device=device, threads=cfg.threads,
                                         batch_size=batch_size)
    if cfg.torch_baseline:
        run = Path(cfg.run or manifest.get("source_run") or "")
        if not (run / "model.safetensors").is_file():
            skipped.append({"backend": "torch", "reason": f"training run {run} not found; pass --run RUN"})
        else:
            devices = ["cpu"]
            cuda_ok, cuda_why = torch_cuda_status()
            if cuda_ok:
                devices.append("cuda")
            else:
                skipped.append({"backend": "torch-cuda", "reason": cuda_why})
            for device in devices:
                suffix = "-cuda" if device == "cuda" else ""
                out[(f"torch{suffix}", "fp32")] = TorchClassifier(bundle, run, threads=cfg.threads, device=device,
                                                                  batch_size=batch_size)
                if cfg.torch_compile:
                    out[(f"torch-compile{suffix}", "fp32")] = TorchClassifier(
                        bundle, run, compile=True, threads=cfg.threads, device=device, batch_size=batch_size)
    return out, skipped


def run_suite(bundle: str | Path, cfg: BenchConfig | None = None) -> dict[str, Any]:
    """Measure a bundle; returns the result dict (schema in huse.benchmarks.compare)."""
    from tqdm.auto import tqdm

    from huse.benchmarks.flops import count_flops
    from huse.benchmarks.report import backend_device, build_efficiency

    cfg = cfg or BenchConfig()
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    started = time.time()
    if cfg.shared_threads:  # before the first session: the Classifiers' sessions then share one pool
        from huse.runtime.backends.onnxrt.runner import share_threads

        share_threads(cfg.threads)
    clfs, skipped = _classifiers(bundle, manifest, cfg)
    any_clf = next(iter(clfs.values()))
    with tempfile.TemporaryDirectory() as tmp:
        data = BenchData(manifest, any_clf, cfg.eval_size, Path(tmp))
        configs = [(b, p, m, k, n) for (b, p) in clfs for k in cfg.kinds for m in cfg.modes for n in cfg.batches]
        calls = {c: _call(clfs[c[:2]], c[3], c[2], data, c[4]) for c in configs}
        samples: dict[tuple, list[np.ndarray]] = {c: [] for c in configs}
        gpu_ours = next((c for c in _GPU_HEADLINE_CANDIDATES if c in clfs), None)
        gpu_pair = (gpu_ours, ("torch-cuda", "fp32")) if gpu_ours and ("torch-cuda", "fp32") in clfs else None
        int8_pair = _CPU_INT8_HEADLINE if all(c in clfs for c in _CPU_INT8_HEADLINE) else None
        n_headlines = 1 + bool(int8_pair) + bool(gpu_pair)
        bar = tqdm(total=cfg.repeats * len(configs) + cfg.headline_repeats * n_headlines, desc="huse-bench",
                   unit="cfg", disable=not cfg.progress, mininterval=2)
        errors: dict[tuple, str] = {}
        for _ in range(cfg.repeats):
            for c in configs:
                if c not in errors:
                    try:
                        samples[c].append(stats.time_fn(calls[c], warmup=2, min_iters=3, min_seconds=0.1,
                                                        max_seconds=cfg.seconds))
                    except HuseError as e:  # e.g. a batch above a TensorRT profile's max: one row, not the run
                        errors[c] = str(e)
                bar.update(1)
        headline = _headline(clfs, data, cfg, bar, *_CPU_HEADLINE)
        int8_headline = (_headline(clfs, data, cfg, bar, *int8_pair) if int8_pair else
                         {"status": "skipped", "reason": "no int8-cpu graphs in the bundle (huse-export --int8-cpu)"})
        gpu_headline = (_headline(clfs, data, cfg, bar, *gpu_pair) if gpu_pair else
                        {"status": "skipped", "reason": "needs a GPU backend and a CUDA torch (torch-cuda) in the same run"})
        bar.close()
        results = [_row(c, samples[c]) if c not in errors else
                   {**dict(zip(("backend", "precision", "mode", "kind", "batch"), c)), "status": "error", "reason": errors[c]}
                   for c in configs]
        results += [{"backend": s["backend"], "precision": s.get("precision"), "mode": None, "kind": None, "batch": None,
                     "status": "skipped", "reason": s["reason"]} for s in skipped]
        concurrency = _concurrency(clfs, data, cfg)
        accuracy = _accuracy(clfs, data)
        memory = _memory(clfs, bundle, manifest, cfg, data.paths[0], data.titles[0])
        gpu_phases = _gpu_phases(clfs, data, cfg)
        # one core per stage: a shared pool has every core (its size is the process's)
        stage_costs = None if cfg.shared_threads else stage_costs_one_core(bundle, manifest, data, cfg)
    for c in clfs.values():
        c.close()
    # A MiniLM graph's work follows the title length: counted at the width of the headline batch's titles.
    tokens = data.take(0, min(cfg.headline_batch, len(data.titles)))[2]["input_ids"].shape[1]
    flops = {m: count_flops(bundle / manifest["models"]["fp32"][m], dim_values={"batch": 1, "tokens": tokens})
             for m in cfg.modes}
    peaks = {"cpu": matmul_peak_flops(seconds=1.0)}
    if any(backend_device(b) == "gpu" for b, _ in clfs):
        gpu = gpu_matmul_peak_flops(seconds=1.0)  # through a CUDA torch; None without one
        peaks.update({f"gpu:{p}": v for p, v in (gpu or {}).items() if "flop_s" in v})
    result = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "config": {"bundle": str(bundle), "backends": sorted({b for b, _ in clfs}),
                   "precisions": sorted({p for _, p in clfs}), "modes": list(cfg.modes), "batches": list(cfg.batches),
                   "kinds": list(cfg.kinds), "repeats": cfg.repeats, "seconds_per_round": cfg.seconds,
                   "threads": cfg.threads or os.cpu_count(), "shared_threads": cfg.shared_threads,
                   "eval_size": len(data.labels)},
        "results": results,
        "headline": headline,
        "cpu_int8_headline": int8_headline,
        "gpu_headline": gpu_headline,
        "concurrency": concurrency,
        "accuracy": accuracy,
        "memory": memory,
        "gpu_phases": gpu_phases,
        "stage_costs": stage_costs,
        "efficiency": {"peaks": peaks, "flops": flops},
    }
    result["efficiency"]["rows"] = build_efficiency(results, {m: f["flops_per_item"] for m, f in flops.items()}, peaks)
    result["config"]["wall_seconds"] = round(time.time() - started, 1)
    return result


def _us_per_item(fn: Callable[[], object], items: int, seconds: float = 0.3) -> float:
    fn()  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n / items * 1e6


def stage_costs_one_core(bundle: Path, manifest: dict[str, Any], data: BenchData, cfg: BenchConfig) -> dict[str, Any]:
    """Microseconds per item of each stage of end-to-end classification on one thread, at the headline batch:
    read, decode, resize, normalise, tokenise (benchmarks/prepare.py's breakdown of `prepare`), then per
    onnxruntime CPU precision each graph alone on one intra-op thread, and describe (top-k and paths).
    The next regression shows where it is; with C cores, end to end is at most C / (sum of the stages)."""
    from huse.benchmarks.prepare import stage_breakdown

    n = min(cfg.headline_batch, len(data.paths))
    paths, titles, feeds = data.take(0, n)
    out: dict[str, Any] = {"batch": n, "threads": 1}
    with Classifier(bundle, backend="onnxruntime", device="cpu", threads=1, batch_size=n) as clf:
        out["prepare"] = stage_breakdown([Path(p) for p in paths], clf.image_spec, titles, clf.tokenizer, seconds=0.3)
    for p in [p for p in (cfg.precisions or sorted(manifest["models"])) if p in manifest["models"]]:
        with Classifier(bundle, backend="onnxruntime", precision=p, device="cpu", threads=1, batch_size=n) as clf:
            row = {}
            for mode in cfg.modes:
                feed = {k: feeds[k] for k in clf.manifest["graphs"][mode]["inputs"]}
                row[f"model_{mode}_us"] = _us_per_item(lambda: clf.run_graph(mode, feed), n)
            prepared = clf.prepare(paths, titles)
            probs = clf.infer(prepared)
            row["describe_us"] = _us_per_item(lambda: clf.describe(prepared, probs), n)
            out[p] = row
    return out


def _row(c: tuple, repeats: list[np.ndarray]) -> dict[str, Any]:
    backend, precision, mode, kind, batch = c
    allsamples = np.concatenate(repeats)
    return {"backend": backend, "precision": precision, "mode": mode, "kind": kind, "batch": batch, "status": "ok",
            "reason": None, "latency_ms": stats.summarize(allsamples, scale=1e3),
            "repeat_spread": stats.repeat_summary(repeats, scale=1e3),
            "throughput_items_s": stats.throughput(batch * len(allsamples), float(allsamples.sum()))}


# Headline pairs: (ours, baseline). The bar is fp32 against fp32; the CPU INT8 line says what the
# accuracy-gated int8-cpu graphs add; the GPU one uses the fastest GPU configuration present.
_CPU_HEADLINE = (("onnxruntime", "fp32"), ("torch", "fp32"))
_CPU_INT8_HEADLINE = (("onnxruntime", "int8-cpu"), ("torch", "fp32"))
_GPU_HEADLINE_CANDIDATES = (("tensorrt", "fp16"), ("tensorrt", "fp32"), ("onnxruntime-cuda", "fp32"))


def _headline(clfs: dict, data: BenchData, cfg: BenchConfig, bar, ours: tuple[str, str],
              base: tuple[str, str]) -> dict[str, Any]:
    """Fused end-to-end at the headline batch, `ours` vs the PyTorch eager `base` on the same
    device, in interleaved rounds (the ratio of each round's medians; their median and range)."""
    if ours not in clfs or base not in clfs:
        missing = [f"{b}/{p}" for b, p in (ours, base) if (b, p) not in clfs]
        return {"status": "skipped", "reason": f"not measured here: {', '.join(missing)}"}
    fn_ours = _call(clfs[ours], "e2e", "fused", data, cfg.headline_batch)
    fn_base = _call(clfs[base], "e2e", "fused", data, cfg.headline_batch)
    o_rounds, b_rounds, ratios = [], [], []
    for _ in range(cfg.headline_repeats):
        o = stats.time_fn(fn_ours, warmup=1, min_iters=3, min_seconds=0.5, max_seconds=3.0)
        b = stats.time_fn(fn_base, warmup=1, min_iters=3, min_seconds=0.5, max_seconds=3.0)
        o_rounds.append(o)
        b_rounds.append(b)
        ratios.append(float(np.median(b) / np.median(o)))
        bar.update(1)
    n = cfg.headline_batch
    o_all, b_all = np.concatenate(o_rounds), np.concatenate(b_rounds)
    return {"status": "ok", "backend": ours[0], "precision": ours[1], "baseline": base[0],
            "mode": "fused", "kind": "e2e", "batch": n,
            "items_s": n / float(np.median(o_all)), "baseline_items_s": n / float(np.median(b_all)),
            "speedup_median": float(np.median(ratios)), "speedup_min": float(min(ratios)), "speedup_max": float(max(ratios)),
            "rounds": len(ratios), "latency_ms": stats.summarize(o_all, scale=1e3),
            "baseline_latency_ms": stats.summarize(b_all, scale=1e3)}


def _concurrency(clfs: dict, data: BenchData, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Fused e2e throughput at batch 8 with 1..N threads calling the same Classifier."""
    out = []
    for (backend, precision), clf in clfs.items():
        if precision != "fp32":
            continue
        fn = _call(clf, "e2e", "fused", data, 8)
        for callers in cfg.concurrency:
            out.append({"backend": backend, "precision": precision, "mode": "fused", "kind": "e2e", "batch": 8,
                        "callers": callers, "items_s": stats.concurrent_throughput(fn, 8, callers, seconds=1.0)})
    return out


def _accuracy(clfs: dict, data: BenchData) -> list[dict[str, Any]]:
    ref: dict[str, np.ndarray] = {}
    rows = []
    for (backend, precision), clf in sorted(clfs.items(), key=lambda kv: kv[0][1] != "fp32"):
        for mode in MODES:
            feeds_img = data.paths if mode != "text" else None
            feeds_txt = data.titles if mode != "image" else None
            p = clf.predict_proba(images=feeds_img, titles=feeds_txt)
            row = {"backend": backend, "precision": precision, "mode": mode, "n": len(data.labels),
                   "top1": float((p.argmax(1) == data.labels).mean())}
            key = f"{backend}:{mode}"
            if precision == "fp32":
                ref[key] = p
            elif key in ref:
                row["top1_agreement"] = float((p.argmax(1) == ref[key].argmax(1)).mean())
                row["max_abs_diff"] = float(np.abs(p - ref[key]).max())
            rows.append(row)
    return rows


def _gpu_phases(clfs: dict, data: BenchData, cfg: BenchConfig) -> list[dict[str, Any]]:
    """TensorRT only: host-to-device, compute and device-to-host times from CUDA events, with and
    without a captured CUDA graph, and the GPU memory each engine holds. Empty without TensorRT."""
    from huse.benchmarks.machine import gpu_memory_mib

    rows = []
    for (backend, precision), clf in clfs.items():
        if backend != "tensorrt":
            continue
        from huse.runtime.backends.trt.runner import TrtRunner

        for mode in cfg.modes:
            inputs = clf.manifest["graphs"][mode]["inputs"]
            for batch in cfg.batches:
                feed = {k: v for k, v in data.take(0, batch)[2].items() if k in inputs}
                for graphs in (False, True):
                    row = {"backend": backend, "precision": precision, "mode": mode, "batch": batch, "cuda_graph": graphs}
                    try:
                        before = gpu_memory_mib()
                        runner = TrtRunner.for_bundle(clf.bundle, clf.manifest, mode, precision,
                                                      cuda_graph_batches=(batch,) if graphs else ())
                        with runner:
                            after = gpu_memory_mib()
                            for _ in range(3):
                                runner.infer_phases(feed)
                            phases = [runner.infer_phases(feed)[1] for _ in range(20)]
                        row.update({k: float(np.median([p[k] for p in phases])) for k in phases[0]})
                        row["gpu_memory_mib"] = after - before if after is not None and before is not None else None
                    except HuseError as e:
                        row.update(status="error", reason=str(e))
                    rows.append(row)
    return rows


_COLD = """
import os, sys, time
t0 = time.perf_counter()
{imports}
clf = {make}
clf.classify(images=[{image!r}], titles=[{title!r}])
t1 = time.perf_counter()
# VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
gpu = {gpu}
print(t1 - t0, int(hwm) / 1024, "torch" in sys.modules, gpu)
"""
# This process's GPU memory (NVML, per process), for the GPU backends' fresh processes.
_COLD_GPU = "__import__('huse.benchmarks.machine', fromlist=['gpu_memory_mib']).gpu_memory_mib(os.getpid())"


def _memory(clfs: dict, bundle: Path, manifest: dict[str, Any], cfg: BenchConfig, img: str,
            title: str) -> list[dict[str, Any]]:
    """Per measured (backend, precision): size on disk of the model files it ran (ONNX graphs,
    or TensorRT engines as built on this GPU), and the cold start, peak RSS and GPU memory of a
    fresh process classifying one product. TensorRT's cold start loads the engines this run
    built and cached; it does not include building them."""
    rows = []
    for (label, precision), clf in clfs.items():
        if label.startswith("torch"):
            continue
        files = clf.loaded_files
        row = {"backend": label, "precision": precision, "mode": "all",
               "size_mib": sum(f.stat().st_size for f in files.values() if f.is_file()) / 2**20,
               "files": sorted(files)}
        if cfg.cold_start:
            code = _COLD.format(imports="from huse.runtime import Classifier",
                                make=f"Classifier({str(bundle)!r}, backend={clf.backend!r}, device={clf.device!r}, "
                                     f"precision={precision!r})",
                                image=img, title=title, gpu=_COLD_GPU if clf.device == "cuda" else "None")
            row.update(_cold(code))
        rows.append(row)
    run = Path(cfg.run or manifest.get("source_run") or "")
    if cfg.cold_start and cfg.torch_baseline and (run / "model.safetensors").is_file():
        code = _COLD.format(imports="from huse.benchmarks.suite import TorchClassifier",
                            make=f"TorchClassifier({str(bundle)!r}, {str(run)!r})", image=img, title=title, gpu="None")
        rows.append({"backend": "torch", "precision": "fp32", "mode": "all",
                     "size_mib": (run / "model.safetensors").stat().st_size / 2**20, **_cold(code)})
    return rows


def _cold(code: str, repeats: int = 3) -> dict[str, Any]:
    times, rss, gpu = [], [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            return {"cold_start_error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
        t, r, torch_loaded, g = out.stdout.split()[-4:]
        times.append(float(t))
        rss.append(float(r))
        gpu.append(None if g == "None" else float(g))
    return {"cold_start_s": float(np.median(times)), "cold_start_spread_s": float(max(times) - min(times)),
            "peak_rss_mib": float(np.median(rss)), "imports_torch": torch_loaded == "True",
            "gpu_memory_mib": None if None in gpu else float(np.median(gpu))}


def import_time(repeats: int = 7) -> dict[str, Any]:
    """Wall time of `import huse.runtime` in fresh processes (median and range)."""
    code = "import time; t = time.perf_counter(); import huse.runtime, sys; print(time.perf_counter() - t, 'torch' in sys.modules)"
    times, torch_loaded = [], False
    for _ in range(repeats):
        t, tl = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(t))
        torch_loaded |= tl == "True"
    return {"median_s": float(np.median(times)), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "imports_torch": torch_loaded}


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """result.json, result.md and PNG plots in `out`."""
    from huse.benchmarks.report import plot, to_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "result.md").write_text(to_markdown(result))
    return [out / "result.json", out / "result.md"] + plot(result, out)
