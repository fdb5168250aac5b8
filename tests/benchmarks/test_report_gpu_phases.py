"""The GPU-phase table appears only when TensorRT rows were measured (rendering only: no GPU numbers)."""

from __future__ import annotations

from huse.benchmarks.report import to_markdown


def test_gpu_phase_table_only_with_rows(synthetic):
    synthetic = synthetic()
    assert "## GPU phases" not in to_markdown(synthetic)
    rows = [{"backend": "tensorrt", "precision": "fp16", "mode": "fused", "batch": 8, "cuda_graph": False,
             "h2d_ms": 0.25, "compute_ms": 1.5, "d2h_ms": 0.125, "gpu_memory_mib": 40.0},
            {"backend": "tensorrt", "precision": "fp16", "mode": "fused", "batch": 8, "cuda_graph": True, "graph_ms": 1.75},
            {"backend": "tensorrt", "precision": "int8", "mode": "fused", "batch": 128, "cuda_graph": False,
             "status": "error", "reason": "batch 128 above the profile max 64"}]
    md = to_markdown({**synthetic, "gpu_phases": rows})
    table = md[md.index("## GPU phases"):].split("\n\n")[1]
    assert "| tensorrt | fp16 | fused | 8 | no | 0.250 | 1.500 | 0.125 | - | 40 |" in table
    assert "| tensorrt | fp16 | fused | 8 | yes | - | - | - | 1.750 | - |" in table
    assert "int8" not in table  # error rows are listed nowhere as measurements
