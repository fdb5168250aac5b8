"""Markdown table and PNG figures from a result."""

from __future__ import annotations

import pytest

from huse.benchmarks.report import baseline_row, build_efficiency, plot, to_markdown


def _table_rows(md: str) -> list[list[str]]:
    section = md.split("## Latency and throughput")[1].split("\n## ")[0]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| backend")
    ]


def test_markdown_has_a_row_per_configuration_with_speedup_vs_torch(synthetic):
    result = synthetic()
    md = to_markdown(result)
    rows = _table_rows(md)
    measured = [r for r in result["results"] if r["status"] == "ok"]
    assert len(rows) == len(measured)
    by_key = {tuple(r[:5]): r for r in rows}
    r = by_key[("onnxrt", "int8", "image", "model", "8")]
    # p50 and the speedup: torch fp32 is 4.0 ms/item-units, onnxrt int8 1.5 -> 2.67x.
    expected = next(x for x in measured if (x["backend"], x["precision"], x["mode"], x["kind"],
                                            x["batch"]) == ("onnxrt", "int8", "image", "model", 8))
    assert r[5] == f"{expected['latency_ms']['p50']:.3g}"
    assert r[9] == f"{4.0 / 1.5:.2f}x"
    assert r[10] == "84.0%"  # int8 top-1 from the accuracy section
    assert by_key[("torch", "fp32", "image", "model", "8")][9] == "baseline"
    assert "Test CPU" in md and "no GPU" in md


def test_markdown_lists_skipped_configurations_with_the_reason(synthetic):
    md = to_markdown(synthetic())
    assert "## Not measured" in md
    assert "trt/fp16/image/model/1: skipped (no usable NVIDIA GPU)" in md


def test_speedup_is_blank_without_a_baseline_row(synthetic):
    result = synthetic()
    result["results"] = [r for r in result["results"] if r["backend"] != "torch"]
    rows = _table_rows(to_markdown(result))
    assert rows and all(r[9] == "-" for r in rows)
    assert baseline_row(result, result["results"][0]) is None


def test_build_efficiency_divides_achieved_by_the_device_peak(synthetic):
    result = synthetic()
    rows = build_efficiency(result["results"], {"image": 1e9}, {"cpu": {"flop_s": 1e11}})
    assert rows and {r["mode"] for r in rows} == {"image"} and {r["kind"] for r in rows} == {"model"}
    r = rows[0]
    src = next(x for x in result["results"] if x["status"] == "ok" and
               (x["backend"], x["precision"], x["mode"], x["kind"], x["batch"]) ==
               (r["backend"], r["precision"], r["mode"], r["kind"], r["batch"]))
    assert r["achieved_flop_s"] == pytest.approx(1e9 * src["throughput_items_s"])
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_flop_s"] / 1e11)
    # No GPU peak: trt rows would be left out rather than divided by the CPU's peak.
    assert all(r["device"] == "cpu" for r in rows)


def test_plot_writes_non_empty_pngs(tmp_path, synthetic):
    pytest.importorskip("matplotlib", reason="figures need matplotlib: pip install 'huse-edge[bench]'")
    result = synthetic()
    # One panel per figure keeps the drawing time down; more modes and kinds are more panels
    # drawn by the same code.
    result["results"] = [r for r in result["results"] if (r["mode"], r["kind"]) == ("image", "model")]
    result["efficiency"]["rows"] = build_efficiency(result["results"], {"image": 1e9}, {"cpu": 1e11})
    paths = plot(result, tmp_path / "figs")
    assert {p.name for p in paths} == {"latency_vs_batch.png", "throughput_vs_batch.png",
                                       "accuracy_vs_latency.png", "efficiency.png"}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_leaves_out_figures_without_data(tmp_path, synthetic):
    pytest.importorskip("matplotlib", reason="figures need matplotlib: pip install 'huse-edge[bench]'")
    result = synthetic()
    result["results"] = [r for r in result["results"] if (r["mode"], r["kind"]) == ("image", "model")]
    result["accuracy"] = []
    result["efficiency"] = {}
    assert {p.name for p in plot(result, tmp_path)} == {"latency_vs_batch.png",
                                                        "throughput_vs_batch.png"}


def test_gpu_rows_are_quoted_against_the_gpu_baseline_only(synthetic):
    """A GPU backend's speedup is against torch on the GPU (same device), never against CPU torch."""
    from tests.benchmarks.conftest import make_row

    result = synthetic()
    trt = {**make_row("onnxrt", "fp32", "image", "model", 8), "backend": "tensorrt"}  # 2.0 units
    torch_cuda = {**make_row("onnxrt", "int8", "image", "model", 8), "backend": "torch-cuda", "precision": "fp32"}  # 1.5
    result["results"] += [trt]
    rows = {tuple(r[:5]): r for r in _table_rows(to_markdown(result))}
    assert rows[("tensorrt", "fp32", "image", "model", "8")][9] == "-"  # CPU torch (4.0 units) is not its baseline
    result["results"] += [torch_cuda]
    rows = {tuple(r[:5]): r for r in _table_rows(to_markdown(result))}
    assert rows[("tensorrt", "fp32", "image", "model", "8")][9] == f"{1.5 / 2.0:.2f}x"
    assert rows[("torch-cuda", "fp32", "image", "model", "8")][9] == "baseline"
    assert rows[("onnxrt", "fp32", "image", "model", "8")][9] == f"{4.0 / 2.0:.2f}x"  # CPU rows: CPU torch


def test_gpu_rows_use_the_peak_of_their_precision():
    from tests.benchmarks.conftest import make_row

    fp16 = {**make_row("onnxrt", "fp16", "image", "model", 8), "backend": "tensorrt"}
    int8 = {**make_row("onnxrt", "int8", "image", "model", 8), "backend": "tensorrt"}
    cpu = make_row("onnxrt", "fp16", "image", "model", 8)
    peaks = {"cpu": 1e11, "gpu:fp32": 2e13, "gpu:fp16": 4e14}
    rows = {(r["device"], r["precision"]): r for r in build_efficiency([fp16, int8, cpu], {"image": 1e9}, peaks)}
    assert rows[("gpu", "fp16")]["peak_flop_s"] == 4e14
    assert ("gpu", "int8") not in rows  # no int8 peak and no plain "gpu" one: left out, not divided by another
    assert rows[("cpu", "fp16")]["peak_flop_s"] == 1e11  # the CPU has one peak for every precision


def test_gpu_matmul_peak_is_none_without_a_cuda_torch():
    torch = pytest.importorskip("torch")
    from huse.benchmarks.machine import gpu_matmul_peak_flops

    if torch.version.cuda is not None and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    assert gpu_matmul_peak_flops(seconds=0.01) is None


@pytest.mark.gpu
def test_gpu_matmul_peak_measures_fp32_and_fp16():
    torch = pytest.importorskip("torch")
    from huse.benchmarks.machine import gpu_matmul_peak_flops

    if torch.version.cuda is None or not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no usable CUDA GPU")
    peaks = gpu_matmul_peak_flops(seconds=0.2, n=2048)
    assert peaks["fp32"]["flop_s"] > 1e11 and peaks["fp16"]["flop_s"] > peaks["fp32"]["flop_s"]


def test_headline_lines_name_each_pair(synthetic):
    result = synthetic()
    common = {"status": "ok", "precision": "fp32", "mode": "fused", "kind": "e2e", "batch": 64, "rounds": 7,
              "speedup_median": 2.1, "speedup_min": 1.9, "speedup_max": 2.4}
    result["headline"] = {**common, "backend": "onnxruntime", "baseline": "torch", "items_s": 840, "baseline_items_s": 400}
    result["gpu_headline"] = {"status": "skipped", "reason": "no GPU"}
    md = to_markdown(result)
    assert "onnxruntime fp32 840 items/s vs PyTorch eager 400 items/s, **2.10x**" in md
    assert "CUDA" not in md.split("## Headline")[1].split("\n## ")[0]
    result["gpu_headline"] = {**common, "backend": "tensorrt", "precision": "fp16", "baseline": "torch-cuda",
                              "items_s": 9000, "baseline_items_s": 1500, "speedup_median": 6.0}
    assert "tensorrt fp16 9000 items/s vs PyTorch eager on CUDA 1500 items/s, **6.00x**" in to_markdown(result)
