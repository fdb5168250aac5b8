"""benchmarks/decode.py at its tiny scale: every step runs and reports (no timing asserted)."""

from __future__ import annotations

from huse.benchmarks.decode import run


def test_tiny_scale_reports_every_figure(tiny_bundle):
    res = run("tiny", str(tiny_bundle))
    assert res["jpeg"]["ms_draft_on"] > 0 and res["jpeg"]["ms_draft_off"] > 0
    assert res["deep_png"]["cap_default"]["outcome"] == "decoded"  # 600x600 is far under the cap
    assert res["deep_png"]["cap_lifted"]["outcome"] == "decoded"
    assert res["bundle"]["load_manifest_ms"] > 0 and res["bundle"]["verify_signature_ms"] > 0
