"""huse-bench end to end on the tiny bundle: schema, baseline side by side, outputs, compare CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def result(tiny_bundle):
    from huse.benchmarks.suite import BenchConfig, run_suite

    cfg = BenchConfig(batches=(1, 4), repeats=2, seconds=0.05, headline_batch=8, headline_repeats=2, eval_size=24,
                      concurrency=(1, 2), cold_start=False, progress=False)
    return run_suite(tiny_bundle, cfg)


def test_every_configuration_is_measured_beside_the_baseline(result):
    ok = [r for r in result["results"] if r["status"] == "ok"]
    keys = {(r["backend"], r["mode"], r["kind"], r["batch"]) for r in ok}
    for backend in ("onnxruntime", "torch"):
        for mode in ("image", "text", "fused"):
            for kind in ("model", "e2e"):
                for batch in (1, 4):
                    assert (backend, mode, kind, batch) in keys
    for r in ok:
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"] and lat["n"] >= 2  # one sample per round at least
        assert r["repeat_spread"]["n_repeats"] == 2 and r["throughput_items_s"] > 0
    from huse.runtime.backends import gpu_backends

    skipped = {r["backend"]: r["reason"] for r in result["results"] if r["status"] == "skipped"}
    measured = {r["backend"] for r in ok}
    from huse.benchmarks.suite import torch_cuda_status

    status = {**gpu_backends(), "torch-cuda": torch_cuda_status()}
    for label, (usable, reason) in status.items():  # each GPU backend: measured, or skipped with its own reason
        assert (label in measured) == usable
        assert (skipped.get(label) == reason) == (not usable)


def test_headline_and_accuracy_compare_like_with_like(result):
    h = result["headline"]
    assert h["status"] == "ok" and h["batch"] == 8 and h["rounds"] == 2
    assert h["speedup_min"] <= h["speedup_median"] <= h["speedup_max"]
    assert (h["backend"], h["precision"], h["baseline"]) == ("onnxruntime", "fp32", "torch")
    assert h["items_s"] / h["baseline_items_s"] == pytest.approx(
        h["baseline_latency_ms"]["p50"] / h["latency_ms"]["p50"], rel=1e-6)
    assert result["cpu_int8_headline"] == {"status": "skipped",
                                           "reason": "no int8-cpu graphs in the bundle (huse-export --int8-cpu)"}
    g = result["gpu_headline"]
    measured = {r["backend"] for r in result["results"] if r["status"] == "ok"}
    if "torch-cuda" not in measured:  # no GPU pair here: said so, not invented
        assert g["status"] == "skipped" and "torch-cuda" in g["reason"]
    acc = {(a["backend"], a["mode"]): a["top1"] for a in result["accuracy"]}
    for mode in ("image", "text", "fused"):
        # Same weights, same inputs: onnxruntime and torch must classify alike.
        assert acc[("onnxruntime", mode)] == pytest.approx(acc[("torch", mode)], abs=1 / 24 + 1e-9)
    assert result["efficiency"]["flops"]["image"]["flops_per_item"] > 0
    assert [c["callers"] for c in result["concurrency"] if c["backend"] == "onnxruntime"] == [1, 2]


def test_outputs_and_compare_flag_an_injected_slowdown(result, tmp_path):
    from huse.benchmarks.cli import main
    from huse.benchmarks.suite import write_outputs

    files = write_outputs(result, tmp_path / "a")
    assert all(f.stat().st_size > 0 for f in files) and any(f.suffix == ".png" for f in files)
    md = (tmp_path / "a" / "result.md").read_text()
    assert "## Headline" in md and "vs PyTorch eager" in md
    slower = copy.deepcopy(result)
    row = next(r for r in slower["results"] if r["status"] == "ok" and r["backend"] == "onnxruntime")
    for k in ("p50", "p99"):
        row["latency_ms"][k] *= 1.2 * (1 + (row["repeat_spread"].get("spread") or 0))
    row["throughput_items_s"] /= 1.2 * (1 + (row["repeat_spread"].get("spread") or 0))
    (tmp_path / "b.json").write_text(json.dumps(slower))
    same = CliRunner().invoke(main, ["compare", str(tmp_path / "a" / "result.json"), str(tmp_path / "a" / "result.json")])
    assert same.exit_code == 0, same.output
    flagged = CliRunner().invoke(main, ["compare", str(tmp_path / "a" / "result.json"), str(tmp_path / "b.json")])
    assert flagged.exit_code == 1 and "REGRESSION" in flagged.output.upper()


@pytest.mark.parametrize("args, says", [
    (["run", "--batches", "0"], "Invalid value for '--batches': comma-separated positive integers"),
    (["run", "--batches", "8,x"], "Invalid value for '--batches'"),
    (["run", "--modes", "text,photo"], "'photo' is not one of image, text, fused"),
    (["run", "--precisions", "fp8"], "'fp8' is not one of fp32, fp16, int8, int8-cpu"),
    (["serve", "--systems", "triton,nginx"], "'nginx' is not one of max-batch-1, batching, triton"),
    (["serve", "--concurrency", "-4"], "Invalid value for '--concurrency'")])
def test_bad_lists_are_refused_before_anything_runs(tiny_bundle, tmp_path, args, says):
    from huse.benchmarks.cli import main

    r = CliRunner().invoke(main, [args[0], str(tiny_bundle), *args[1:], "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and says in r.output, r.output  # click's usage error, not a traceback
    assert not (tmp_path / "out").exists()


def test_memory_rows_measure_a_fresh_process_per_backend(tiny_bundle, tiny_catalog):
    """Size on disk of the graphs a backend ran, and a fresh process's cold start without torch."""
    from pathlib import Path

    from huse.benchmarks.suite import BenchConfig, _memory
    from huse.runtime import Classifier
    from huse.runtime.bundle import load_manifest

    manifest = load_manifest(tiny_bundle)
    img = next((Path(tiny_catalog).parent / "images").glob("*.png"))
    with Classifier(tiny_bundle, backend="onnxruntime", device="cpu") as clf:
        clf.classify(images=[str(img)], titles=["red shirt"])  # opens the fused graph only
        rows = _memory({("onnxruntime", "fp32"): clf}, Path(tiny_bundle), manifest,
                       BenchConfig(torch_baseline=False), str(img), "red shirt")
    (row,) = rows
    assert row["backend"] == "onnxruntime" and row["files"] == ["fused"]
    assert row["size_mib"] == pytest.approx((Path(tiny_bundle) / manifest["models"]["fp32"]["fused"]).stat().st_size / 2**20)
    assert "cold_start_error" not in row, row
    assert 0 < row["cold_start_s"] < 60 and row["peak_rss_mib"] > 20
    assert row["imports_torch"] is False and row["gpu_memory_mib"] is None


@pytest.mark.gpu
def test_torch_cuda_baseline_matches_the_cpu_baseline(tiny_bundle, tiny_run):
    """Atol 1e-4 on probabilities: the same fp32 model on two devices (cuDNN may reorder sums)."""
    import numpy as np

    from huse.benchmarks.suite import TorchClassifier, torch_cuda_status

    ok, why = torch_cuda_status()
    if not ok:
        pytest.skip(why)
    titles = ["red cotton shirt", "leather boots", "a bag"]
    cpu = TorchClassifier(tiny_bundle, tiny_run)
    gpu = TorchClassifier(tiny_bundle, tiny_run, device="cuda")
    np.testing.assert_allclose(gpu.predict_proba(titles=titles), cpu.predict_proba(titles=titles), atol=1e-4)


def test_stage_costs_name_every_stage_on_one_thread(result):
    sc = result["stage_costs"]
    assert sc["threads"] == 1 and sc["batch"] == 8
    # the usual per-image steps, and the small-PNG path's own (read whole, chunk parse, batch decode + resize)
    assert set(sc["prepare"]) == {"read_us", "decode_us", "resize_us", "normalise_us", "prepare_us", "tokenise_us",
                                  "read_whole_us", "small_png_parse_us", "small_png_decode_resize_us"}
    for p in result["config"]["precisions"]:
        if p in sc:
            assert set(sc[p]) == {f"model_{m}_us" for m in result["config"]["modes"]} | {"describe_us"}
            assert all(v > 0 for v in sc[p].values())
    assert "fp32" in sc


def test_the_pytorch_baseline_pads_titles_as_a_hugging_face_user_does(tiny_minilm_bundle, tiny_minilm_run, tmp_path):
    """To the batch's longest title exactly (`padding=True`), whatever multiple the bundle rounds up to: a bundle
    exported before with pad_multiple 8 feeds onnxruntime 8 tokens, the baseline the 4 that "red shirt" has."""
    import shutil

    import numpy as np

    from huse.benchmarks.suite import TorchClassifier
    from huse.runtime.bundle import write_manifest
    from huse.runtime.classifier import Classifier

    bundle = tmp_path / "pad8"
    shutil.copytree(tiny_minilm_bundle, bundle, ignore=shutil.ignore_patterns("fp16", "int8-cpu"))
    m = json.loads((bundle / "manifest.json").read_text())
    m["tokenizer"]["pad_multiple"] = 8
    m["models"] = {"fp32": m["models"]["fp32"]}
    for key in ("format", "format_version", "files"):
        m.pop(key, None)
    write_manifest(bundle, m)
    titles = ["red shirt", "blue"]
    with Classifier(bundle, backend="onnxruntime", threads=1) as ours, TorchClassifier(bundle, tiny_minilm_run) as base:
        assert ours.tokenizer.inputs(titles)["input_ids"].shape[1] == 8
        feed = base.tokenizer.inputs(titles)
        assert feed["input_ids"].shape[1] == feed["attention_mask"].sum(1).max() == 4
        np.testing.assert_allclose(base.predict_proba(titles=titles), ours.predict_proba(titles=titles), atol=1e-4)


def test_a_shared_thread_pool_run_says_so_and_skips_the_one_core_stage_costs(tiny_bundle, tmp_path):
    # onnxruntime's shared pool is chosen before a process's first session: a fresh process, as huse-bench is
    out = tmp_path / "shared"
    done = subprocess.run([sys.executable, "-m", "huse.benchmarks.cli", "run", str(tiny_bundle), "--out", str(out),
                           "--batches", "1", "--modes", "text", "--precisions", "fp32", "--repeats", "1",
                           "--seconds", "0.05", "--eval-size", "8", "--no-torch", "--no-cold-start", "--shared-threads"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["shared_threads"] is True and result["stage_costs"] is None
    assert [r["status"] for r in result["results"] if r["backend"] == "onnxruntime"] == ["ok", "ok"]
