"""compare(): a real slowdown is flagged, noise is not."""

from __future__ import annotations

import json

import pytest

from huse.benchmarks.compare import (
    compare,
    format_compare,
    load_result,
    machine_mismatch,
    validate_result,
)
from huse.runtime.errors import HuseError

SLOW = ("onnxrt", "int8", "image", "model", 8)


def test_a_20_percent_slowdown_is_flagged_in_that_configuration_only(synthetic):
    a = synthetic()
    b = synthetic(slow=SLOW, slowdown=1.2)
    rows = compare(a, b)
    flagged = {(r.backend, r.precision, r.mode, r.kind, r.batch) for r in rows if r.regression}
    assert flagged == {SLOW}
    slow_rows = {r.metric: r for r in rows if (r.backend, r.precision, r.mode, r.kind, r.batch) == SLOW}
    # Latency and throughput all say the same thing.
    assert set(slow_rows) == {"p50_ms", "p99_ms", "throughput_items_s"}
    assert all(r.regression for r in slow_rows.values())
    assert slow_rows["p50_ms"].ratio == pytest.approx(1.2)
    assert slow_rows["p50_ms"].change == pytest.approx(0.2)
    assert slow_rows["throughput_items_s"].ratio == pytest.approx(1 / 1.2)
    assert slow_rows["throughput_items_s"].change == pytest.approx(0.2)
    # Every other configuration was compared and found unchanged.
    others = [r for r in rows if (r.backend, r.precision, r.mode, r.kind, r.batch) != SLOW]
    assert others and all(r.status == "same" for r in others)


def test_a_change_within_the_measured_spread_is_not_flagged(synthetic):
    # Both runs' repeats disagree by 15%, so an 8% slowdown is indistinguishable from noise,
    # although it is above the 5% floor.
    a = synthetic(spread=0.15)
    b = synthetic(slow=SLOW, slowdown=1.08, spread=0.15)
    rows = compare(a, b)
    assert not any(r.regression for r in rows)
    r = next(r for r in rows if r.metric == "p50_ms" and
             (r.backend, r.precision, r.mode, r.kind, r.batch) == SLOW)
    assert r.change == pytest.approx(0.08)
    assert r.threshold == pytest.approx(0.15)
    # The same 8% in quiet runs is more than the floor and the spread: flagged.
    quiet = compare(synthetic(spread=0.01), synthetic(slow=SLOW, slowdown=1.08, spread=0.01))
    assert {(r.backend, r.precision, r.mode, r.kind, r.batch) for r in quiet if r.regression} == {SLOW}


def test_the_floor_holds_when_runs_report_no_spread(synthetic):
    # Single-repeat runs have no spread; a 3% change is under the 5% floor, 20% is over it.
    a, b, c = synthetic(), synthetic(slow=SLOW, slowdown=1.03), synthetic(slow=SLOW, slowdown=1.2)
    for res in (a, b, c):
        for row in res["results"]:
            if "repeat_spread" in row:
                row["repeat_spread"] = {"n_repeats": 1, "spread": None, "p99_spread": None}
    assert not any(r.regression for r in compare(a, b))
    assert any(r.regression for r in compare(a, c))


def test_speedups_are_improvements_and_a_fixed_threshold_overrides_spread(synthetic):
    a, b = synthetic(), synthetic(slow=SLOW, slowdown=1 / 1.3)
    rows = compare(a, b)
    assert not any(r.regression for r in rows)
    assert {r.metric for r in rows if r.status == "improvement"} == {"p50_ms", "p99_ms",
                                                                       "throughput_items_s"}
    c = synthetic(slow=SLOW, slowdown=1.2)
    assert not any(r.regression for r in compare(a, c, threshold=0.25))


def test_configurations_in_only_one_result_are_listed(synthetic):
    a, b = synthetic(), synthetic()
    b["results"] = [r for r in b["results"] if r["batch"] != 32]
    rows = compare(a, b)
    only_a = [r for r in rows if r.status == "only_in_a"]
    assert only_a and all(r.batch == 32 and r.metric == "-" for r in only_a)
    # Skipped rows (the trt row in both) are not configurations to compare.
    assert not any(r.backend == "trt" for r in rows)


def test_format_compare_marks_regressions_and_counts_them(synthetic):
    text = format_compare(compare(synthetic(), synthetic(slow=SLOW, slowdown=1.2)))
    lines = [l for l in text.splitlines() if "REGRESSION" in l]
    assert len(lines) == 3 and all("onnxrt/int8/image/model/b8" in l for l in lines)
    assert "+20.0%" in lines[0]
    assert text.splitlines()[-1].startswith("3 regression(s), 0 improvement(s)")
    short = format_compare(compare(synthetic(), synthetic(slow=SLOW, slowdown=1.2)), only_changes=True)
    assert len(short.splitlines()) == 2 + 3 + 2  # header, rule, 3 rows, blank, verdict


def test_load_result_validates(tmp_path, synthetic):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(synthetic()))
    assert load_result(good)["schema"] == "huse-bench/1"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other", "results": [{"backend": "onnxrt"}]}))
    with pytest.raises(HuseError, match="schema is 'other'.*lacks"):
        load_result(bad)
    with pytest.raises(HuseError, match="does not exist"):
        load_result(tmp_path / "missing.json")
    with pytest.raises(HuseError, match="JSON object"):
        validate_result([])


def test_machine_mismatch_names_what_differs(synthetic):
    a, b = synthetic(), synthetic()
    assert machine_mismatch(a, b) == []
    b["machine"]["cpu"]["model"] = "Other CPU"
    assert machine_mismatch(a, b) == ["cpu.model: 'Test CPU' vs 'Other CPU'"]
