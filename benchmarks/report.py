"""Render a huse-bench result (schema in `huse.benchmarks.compare`) as Markdown and PNG figures.

Also `build_efficiency`, which turns measured throughput, counted FLOPs and the measured matmul
peak into the "fraction of peak" rows that the efficiency figure plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from huse.benchmarks.compare import BASELINE_BACKEND, config_key
from huse.runtime._lazy import lazy_import


# Reference precision first, then by how far each strays from it.
_PRECISION_ORDER = {"fp32": 0, "tf32": 1, "bf16": 2, "fp16": 3, "int8": 4, "int8-cpu": 5, "fp8": 6, "int4": 7}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok" and r.get("latency_ms")]


def _sort_key(row: dict) -> tuple:
    # Rows that are compared with each other sit together: same mode/kind/batch, baseline first.
    return (
        str(row.get("mode")), str(row.get("kind")), row.get("batch") or 0,
        row.get("backend") != baseline_for(row.get("backend")), str(row.get("backend")),
        _PRECISION_ORDER.get(row.get("precision"), len(_PRECISION_ORDER)), str(row.get("precision")),
    )


def baseline_for(backend: str, baseline: str = BASELINE_BACKEND) -> str:
    """The baseline backend on the same device: "torch" for CPU rows, "torch-cuda" for GPU rows."""
    return baseline if backend_device(str(backend)) == "cpu" else f"{baseline}-cuda"


def baseline_row(result: dict, row: dict, baseline: str = BASELINE_BACKEND) -> dict | None:
    """The PyTorch eager row a configuration's speedup is quoted against.

    Same device (`baseline_for`), mode, kind and batch; fp32 preferred (the reference
    precision), else the row with the same precision. A GPU backend is never quoted against
    the CPU baseline.

    Args:
        result: the whole result.
        row: a results row.
        baseline: the baseline backend name.
    Returns:
        The baseline row, or None if the baseline did not run that configuration.
    """
    baseline = baseline_for(row.get("backend"), baseline)
    candidates = [
        r for r in _ok(result.get("results", []))
        if r.get("backend") == baseline
        and (r.get("mode"), r.get("kind"), r.get("batch")) == (row.get("mode"), row.get("kind"), row.get("batch"))
    ]
    for precision in ("fp32", row.get("precision")):
        for r in candidates:
            if r.get("precision") == precision:
                return r
    return None


def _accuracy_for(result: dict, row: dict) -> dict | None:
    for a in result.get("accuracy") or []:
        if (a.get("backend"), a.get("precision"), a.get("mode")) == (
            row.get("backend"), row.get("precision"), row.get("mode")
        ):
            return a
    return None


def _fmt(v, spec: str = ".3g", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _machine_line(machine: dict) -> str:
    cpu = machine.get("cpu") or {}
    libs = machine.get("libraries") or {}
    gpu = machine.get("gpu")
    parts = [
        f"CPU {cpu.get('model') or '?'} ({cpu.get('logical_cores') or '?'} logical cores"
        + (f", {cpu['affinity_cores']} usable" if cpu.get("affinity_cores") else "") + ")",
        f"GPU {gpu.get('name')} (driver {gpu.get('driver')})" if gpu else "no GPU",
    ]
    versions = [f"{k} {v}" for k, v in libs.items() if v and k in ("onnxruntime", "tensorrt", "torch")]
    return "; ".join(parts + versions)


def _headline_lines(result: dict) -> list[str]:
    """The numbers people look for first: e2e speedup vs PyTorch, batch-1 latency, import time, scaling."""
    lines = []
    for key in ("headline", "cpu_int8_headline", "gpu_headline"):
        h = result.get(key) or {}
        if h.get("status") != "ok":
            continue
        if not lines:
            lines += ["## Headline", ""]
        ours = f"{h['backend']} {h['precision']}"
        base = {"torch": "PyTorch eager", "torch-cuda": "PyTorch eager on CUDA"}.get(h["baseline"], h["baseline"])
        items, base_items = h["items_s"], h["baseline_items_s"]
        lines.append(f"- Fused end-to-end (decode + preprocess + tokenise + model + postprocess) at batch {h['batch']}: "
                     f"{ours} {items:.0f} items/s vs {base} {base_items:.0f} items/s, "
                     f"**{h['speedup_median']:.2f}x** (median of {h['rounds']} interleaved rounds; range "
                     f"{h['speedup_min']:.2f}x-{h['speedup_max']:.2f}x).")
    b1 = [r for r in _ok(result.get("results", [])) if r.get("batch") == 1 and r.get("kind") == "e2e"
          and r.get("mode") == "fused" and r.get("precision") == "fp32"]
    for r in b1:
        lat = r["latency_ms"]
        lines.append(f"- Batch-1 fused end-to-end, {r['backend']}: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms.")
    it = result.get("import_time")
    if it:
        lines.append(f"- `import huse.runtime`: median {it['median_s'] * 1000:.0f} ms over {it['repeats']} fresh processes "
                     f"(range {it['min_s'] * 1000:.0f}-{it['max_s'] * 1000:.0f} ms); imports torch: {it['imports_torch']}.")
    conc = result.get("concurrency") or []
    if conc:
        by = {}
        for c in conc:
            by.setdefault(c["backend"], []).append(f"{c['callers']}: {c['items_s']:.0f}")
        for backend, parts in by.items():
            lines.append(f"- Fused e2e batch 8 throughput (items/s) by concurrent callers, {backend}: {', '.join(parts)}.")
    return lines + [""] if lines else []


def to_markdown(result: dict, *, baseline: str = BASELINE_BACKEND) -> str:
    """A readable report: machine, latency/throughput table with speedup vs PyTorch, accuracy,
    memory, efficiency, and what was not measured.

    Args:
        result: a huse-bench result.
        baseline: backend whose rows are the eager baseline (speedup = its p50 / the row's p50).
    Returns:
        Markdown text.
    """
    config = result.get("config") or {}
    lines = [f"# huse-bench: {config.get('bundle', '')}".rstrip(), ""]
    if result.get("machine"):
        lines += [_machine_line(result["machine"]), ""]
    if result.get("created"):
        lines += [f"Measured {result['created']}.", ""]

    lines += _headline_lines(result)
    rows = sorted(_ok(result.get("results", [])), key=_sort_key)
    if rows:
        repeats = config.get("repeats")
        lines += [
            "## Latency and throughput",
            "",
            "Latency in ms per call (one batch). Spread: how much the medians of "
            + (f"{repeats} " if repeats else "")
            + "repeated runs differed, relative; differences smaller than it are noise. "
            + f"Speedup: {baseline} eager p50 / this p50 at the same mode, kind and batch, on the same device "
            + f"({baseline} for CPU rows, {baseline}-cuda for GPU rows).",
            "",
        ]
        body = []
        for r in rows:
            lat = r["latency_ms"]
            spread = (r.get("repeat_spread") or {}).get("spread")
            base = baseline_row(result, r, baseline)
            speedup = None
            if base is not None and lat.get("p50"):
                speedup = base["latency_ms"]["p50"] / lat["p50"]
            acc = _accuracy_for(result, r)
            body.append([
                str(r.get("backend")), str(r.get("precision")), str(r.get("mode")),
                str(r.get("kind")), str(r.get("batch")),
                _fmt(lat.get("p50")), _fmt(lat.get("p99")),
                _fmt(None if spread is None else 100 * spread, ".1f", "%"),
                _fmt(r.get("throughput_items_s"), ".4g"),
                ("baseline" if r.get("backend") == baseline_for(r.get("backend"), baseline) else _fmt(speedup, ".2f", "x")),
                _fmt(None if acc is None else 100 * acc.get("top1", math.nan), ".1f", "%"),
            ])
        lines += _table(
            ["backend", "precision", "mode", "kind", "batch", "p50 ms", "p99 ms", "spread",
             "items/s", f"vs {baseline}", "top-1"],
            body,
        )
        lines.append("")

    accuracy = result.get("accuracy") or []
    if accuracy:
        lines += ["## Accuracy", ""]
        body = [
            [str(a.get("backend")), str(a.get("precision")), str(a.get("mode")), _fmt(a.get("n"), ""),
             _fmt(None if a.get("top1") is None else 100 * a["top1"], ".2f", "%"),
             _fmt(None if a.get("top1_agreement") is None else 100 * a["top1_agreement"], ".2f", "%"),
             _fmt(a.get("max_abs_diff"), ".3g")]
            for a in accuracy
        ]
        lines += _table(["backend", "precision", "mode", "n", "top-1", "top-1 agreement vs fp32",
                         "max prob diff"], body)
        lines.append("")

    memory = result.get("memory") or []
    if memory:
        lines += ["## Memory and cold start", "",
                  "Peak RSS and cold start (process start to first result) of a fresh process classifying one product.", ""]
        body = [
            [str(m.get("backend")), str(m.get("precision")), _fmt(m.get("size_mib"), ".1f"),
             _fmt(m.get("peak_rss_mib"), ".0f"), _fmt(m.get("gpu_memory_mib"), ".0f"),
             _fmt(m.get("cold_start_s"), ".2f", " s") + (f" (range {m['cold_start_spread_s']:.2f} s)" if m.get("cold_start_spread_s") is not None else "")]
            for m in memory
        ]
        lines += _table(["backend", "precision", "on disk MiB", "peak RSS MiB", "GPU MiB", "cold start"], body)
        lines.append("")

    phases = [p for p in result.get("gpu_phases") or [] if p.get("status") != "error"]
    if phases:
        lines += ["## GPU phases (CUDA events, median of 20 calls)", ""]
        body = [[p["backend"], p["precision"], p["mode"], str(p["batch"]), "yes" if p["cuda_graph"] else "no",
                 _fmt(p.get("h2d_ms"), ".3f"), _fmt(p.get("compute_ms"), ".3f"), _fmt(p.get("d2h_ms"), ".3f"),
                 _fmt(p.get("graph_ms"), ".3f"), _fmt(p.get("gpu_memory_mib"), ".0f")] for p in phases]
        lines += _table(["backend", "precision", "mode", "batch", "CUDA graph", "H2D ms", "compute ms", "D2H ms",
                         "graph ms", "engine GPU MiB"], body)
        lines.append("")

    eff = result.get("efficiency") or {}
    if eff.get("rows") or eff.get("peaks"):
        lines += ["## Efficiency", ""]
        for device, peak in (eff.get("peaks") or {}).items():
            p = peak if isinstance(peak, dict) else {"flop_s": peak}
            detail = f" ({p['n']}x{p['n']} {p.get('dtype', '')} matmul)" if p.get("n") else ""
            lines.append(f"- {device} measured peak: {_fmt(p.get('flop_s', math.nan) / 1e9, '.1f')} GFLOP/s{detail}")
        lines.append("")
        if eff.get("rows"):
            body = [
                [str(e.get("backend")), str(e.get("precision")), str(e.get("mode")),
                 str(e.get("kind")), str(e.get("batch")),
                 _fmt(e.get("flops_per_item", math.nan) / 1e9, ".3g"),
                 _fmt(e.get("achieved_flop_s", math.nan) / 1e9, ".3g"),
                 _fmt(100 * e.get("fraction_of_peak", math.nan), ".1f", "%")]
                for e in eff["rows"]
            ]
            lines += _table(["backend", "precision", "mode", "kind", "batch", "GFLOP/item",
                             "GFLOP/s", "of peak"], body)
            lines.append("")

    skipped = [r for r in result.get("results", []) if r.get("status", "ok") != "ok"]
    if skipped:
        lines += ["## Not measured", ""]
        lines += [
            f"- {'/'.join(str(x) for x in config_key(r) if x is not None)}: {r.get('status')}"
            + (f" ({r['reason']})" if r.get("reason") else "")
            for r in skipped
        ]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def backend_device(backend: str) -> str:
    return "gpu" if backend in ("tensorrt", "trt") or backend.endswith("-cuda") else "cpu"


def build_efficiency(
    results: list[dict],
    flops_per_item: dict[str, float],
    peaks: dict[str, float | dict],
    *,
    device_of: Callable[[str], str] = backend_device,
    kinds: tuple[str, ...] = ("model",),
) -> list[dict]:
    """Achieved FLOP/s and fraction of the measured peak for each measured configuration.

    Args:
        results: the result's "results" rows.
        flops_per_item: mode -> `count_flops(...)["flops_per_item"]` of the graph that mode runs.
        peaks: device or "device:precision" -> peak FLOP/s, or a `matmul_peak_flops()` dict;
            a row uses its "device:precision" peak when there is one (GPU: "gpu:fp16" for fp16
            engines), else its device's; a row whose device has no peak is left out (a CPU
            matmul peak says nothing about a GPU).
        device_of: backend -> device name ("trt" runs on "gpu", the rest on "cpu").
        kinds: which kinds to include; "model" by default, because e2e time includes decoding
            and tokenising that the FLOP count does not.

    Returns:
        The "efficiency" "rows" list of the result schema.
    """
    out = []
    for r in _ok(results):
        mode, tput = r.get("mode"), r.get("throughput_items_s")
        device = device_of(r.get("backend"))
        peak = peaks.get(f"{device}:{r.get('precision')}") or peaks.get(device)
        peak = peak.get("flop_s") if isinstance(peak, dict) else peak
        if r.get("kind") not in kinds or mode not in flops_per_item or not tput or not peak:
            continue
        achieved = flops_per_item[mode] * tput
        out.append({
            **{k: r.get(k) for k in ("backend", "precision", "mode", "kind", "batch")},
            "device": device,
            "flops_per_item": flops_per_item[mode],
            "achieved_flop_s": achieved,
            "peak_flop_s": peak,
            "fraction_of_peak": achieved / peak,
        })
    return out


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(str(r.get("mode")), str(r.get("kind"))) for r in rows})


def _series_style(rows: list[dict], baseline: str):
    """A stable colour per backend/precision, the baseline drawn in black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    names = sorted({(r.get("backend"), r.get("precision")) for r in rows}, key=lambda k: (k[0] != baseline, str(k)))
    style = {}
    i = 0
    for name in names:
        if name[0] == baseline:
            style[name] = "black"
        else:
            style[name] = cmap(i % 10)
            i += 1
    return style


def _grid(n: int):
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5 * cols, 3.8 * rows))
    # Fixed margins: constrained/tight layout measures every tick label and was most of the
    # drawing time for a handful of small panels.
    fig.subplots_adjust(left=0.08 if cols > 1 else 0.15, right=0.98, bottom=0.12 / rows,
                        top=1 - 0.08 / rows, wspace=0.3, hspace=0.35)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _batch_axis(ax, batches) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(batches))
    ax.set_xticklabels([str(b) for b in sorted(batches)])
    ax.set_xlabel("batch")
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    # Plain numbers (2, 5, 10, 20) rather than 2x10^0: these are read, not admired.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot(result: dict, out_dir: str | Path, *, baseline: str = BASELINE_BACKEND) -> list[Path]:
    """Draw the result as PNG figures, one panel per mode and kind.

    Figures: latency_vs_batch.png (p50 solid, p99 dashed), throughput_vs_batch.png,
    accuracy_vs_latency.png (top-1 against batch-1 p50, one point per backend/precision; needs
    "accuracy"), efficiency.png (fraction of measured peak FLOP/s; needs "efficiency" rows).
    Figures without data are not written.

    Args:
        result: a huse-bench result.
        out_dir: folder to write into (created if needed).
        baseline: backend drawn in black as the reference.
    Returns:
        The paths written.
    """
    lazy_import("matplotlib", "bench")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _ok(result.get("results", []))
    written: list[Path] = []
    if not rows:
        return written
    style = _series_style(rows, baseline)
    panels = _panels(rows)

    def by_series(panel_rows):
        series: dict[tuple, list[dict]] = {}
        for r in panel_rows:
            series.setdefault((r.get("backend"), r.get("precision")), []).append(r)
        return {k: sorted(v, key=lambda r: r["batch"]) for k, v in sorted(series.items(), key=lambda kv: str(kv[0]))}

    # Latency and throughput against batch.
    for name, ylabel, values in (
        ("latency_vs_batch.png", "latency per call, ms (p50 solid, p99 dashed)",
         lambda r: [(r["latency_ms"]["p50"], "-"), (r["latency_ms"].get("p99"), "--")]),
        ("throughput_vs_batch.png", "throughput, items/s",
         lambda r: [(r.get("throughput_items_s"), "-")]),
    ):
        fig, axes = _grid(len(panels))
        for ax, (mode, kind) in zip(axes, panels):
            panel_rows = [r for r in rows if (str(r.get("mode")), str(r.get("kind"))) == (mode, kind)]
            for key, srows in by_series(panel_rows).items():
                batches = [r["batch"] for r in srows]
                n_lines = len(values(srows[0]))
                for j in range(n_lines):
                    ys = [values(r)[j][0] for r in srows]
                    if all(y is None for y in ys):
                        continue
                    ax.plot(batches, [math.nan if y is None else y for y in ys], values(srows[0])[j][1],
                            marker="o", color=style[key], label=f"{key[0]} {key[1]}" if j == 0 else None)
            _batch_axis(ax, {r["batch"] for r in panel_rows})
            _log_y(ax)
            ax.set_title(f"{mode} ({kind})")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / name))

    # Accuracy against latency: the trade-off a precision choice makes.
    accuracy = [a for a in result.get("accuracy") or [] if a.get("top1") is not None]
    if accuracy:
        modes = sorted({str(a.get("mode")) for a in accuracy})
        fig, axes = _grid(len(modes))
        markers = {"fp32": "o", "fp16": "s", "int8": "^", "int8-cpu": "v"}
        for ax, mode in zip(axes, modes):
            plotted = False
            for a in accuracy:
                if str(a.get("mode")) != mode:
                    continue
                # Batch-1 model latency is the number an edge deployment answers to.
                cands = [r for r in rows if (r.get("backend"), r.get("precision"), str(r.get("mode"))) ==
                         (a.get("backend"), a.get("precision"), mode)]
                if not cands:
                    continue
                r = min(cands, key=lambda r: (r.get("kind") != "model", r["batch"]))
                key = (a.get("backend"), a.get("precision"))
                ax.scatter(r["latency_ms"]["p50"], 100 * a["top1"], color=style.get(key, "grey"),
                           marker=markers.get(str(a.get("precision")), "D"), s=60,
                           label=f"{key[0]} {key[1]}")
                plotted = True
            ax.set_title(f"{mode}: accuracy vs latency (smallest batch)")
            ax.set_xlabel("p50 latency, ms")
            ax.set_ylabel("top-1, %")
            ax.grid(True, alpha=0.3)
            if plotted:
                ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "accuracy_vs_latency.png"))

    eff_rows = (result.get("efficiency") or {}).get("rows") or []
    if eff_rows:
        eff_panels = sorted({(str(e.get("mode")), str(e.get("kind"))) for e in eff_rows})
        fig, axes = _grid(len(eff_panels))
        for ax, (mode, kind) in zip(axes, eff_panels):
            panel = [e for e in eff_rows if (str(e.get("mode")), str(e.get("kind"))) == (mode, kind)]
            for key, srows in by_series(panel).items():
                ax.plot([e["batch"] for e in srows], [100 * e["fraction_of_peak"] for e in srows],
                        "-", marker="o", color=style.get(key, "grey"), label=f"{key[0]} {key[1]}")
            _batch_axis(ax, {e["batch"] for e in panel})
            ax.set_title(f"{mode} ({kind})")
            ax.set_ylabel("% of measured peak FLOP/s")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "efficiency.png"))
    return written


def _save(fig, path: Path) -> Path:
    # Figure objects without pyplot: no global backend switch, nothing left open between calls.
    fig.savefig(path, dpi=110)
    return path
