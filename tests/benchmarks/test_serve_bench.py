"""`huse-bench serve` end to end for a second per level against real `huse serve` processes on loopback, with wrk
and hey as the load generators. Figures are not checked (tests are never timed for figures): that every stage
ran, answered and wrote what the lead reads."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("hey")),
                       reason="needs Debian's wrk and hey (apt-get install wrk hey)"),
]


def test_harness_runs_end_to_end_against_huse_serve(tiny_bundle, tiny_catalog, tmp_path):
    pytest.importorskip("uvicorn", reason="huse serve needs the serve extra")
    from huse.benchmarks.cli import main

    out = tmp_path / "serve"
    res = CliRunner().invoke(main, [
        "serve", str(tiny_bundle), "--out", str(out), "--systems", "max-batch-1,batching", "--concurrency", "1,8",
        "--seconds", "1", "--warmup", "1", "--rounds", "1", "--items", "8", "--data", str(tiny_catalog),
        "--threads", "1", "--overload-seconds", "2", "--deadline", "1"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert (out / "result.md").read_text().startswith("# huse-bench serve")
    assert (out / "throughput_p99.png").stat().st_size > 1000
    # Server logs, wrk scripts and bodies are scratch: the results folder holds the results only.
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "result.md", "throughput_p99.png"]
    for system in ("max-batch-1", "batching"):
        rows = result["systems"][system]
        assert [r["concurrency"] for r in rows] == [1, 8]
        for r in rows:
            # every request of the closed loop was answered with a 2xx, and the generator's CPU was measured
            assert r["requests"] > 0 and r["failed"] == 0 and r["throughput"] > 0
            assert 0 < r["p50_ms"] <= r["p99_ms"] and 0 <= r["generator_cpu"] < 2
            assert r["server_cpu_ms"] > 0  # the server process's own CPU per request (from /proc)
            assert 0 < r["loop_cpu_ms"] <= r["server_cpu_ms"]  # of it, its event loop's (the main thread)
    batching = result["systems"]["batching"][1]["batches"]  # from the server's /metrics histogram
    assert batching["batches"] > 0 and sum(batching["by_size"].values()) == batching["batches"]
    assert result["offline_ceiling"]["throughput"] > 0 and result["api_batch1"]["p50_ms"] > 0
    assert set(result["bars"]) == {"p50_at_1_vs_api_batch1", "overload"}  # the others are at concurrency 64
    overload = result["overload"]
    # what the overload run saw is recorded (its verdicts depend on the machine: not checked here)
    assert overload["load"]["offered_rate"] > 0 and set(overload["checks"]) == {
        "every_request_answered_in_time", "health_within_100ms", "peak_rss_within_1.5x", "normal_afterwards",
        "no_tracebacks"}
    assert overload["health"]["polls"] > 0 and overload["rss"]["loaded_idle_mib"] > 0
    assert overload["after"]["normal"] and overload["checks"]["no_tracebacks"]
