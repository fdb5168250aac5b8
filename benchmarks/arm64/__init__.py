"""The arm64 check: the lean runtime on aarch64 under QEMU user-mode emulation, compared with x86.

    python -m huse.benchmarks.arm64 setup                     # sysroot + wheels, cached (~/.cache/huse/arm64)
    python -m huse.benchmarks.arm64 check BUNDLE --data CATALOG.csv --out arm64.json
    python -m huse.benchmarks.arm64 fp16 BUNDLE --data CATALOG.csv --out arm64-fp16.json   # fp16's error, traced
    python -m huse.benchmarks.arm64 probe                     # which onnxruntime releases start under QEMU

One file per role: env.py (sysroot, wheels, the emulated Python), check.py (the commands on both
sides and the bars), ops.py (kernel counts from onnxruntime's profiler), probe.py (onnxruntime
versions under the emulator), fp16.py (where the fp16 graph's error on Arm comes from).
"""

from huse.runtime._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "huse.benchmarks.arm64.env": ["Arm64Env", "build_env"],
    "huse.benchmarks.arm64.check": ["compare_predictions", "run_check", "sample_catalog"],
    "huse.benchmarks.arm64.fp16": ["fp16_trace", "run_graph"],
    "huse.benchmarks.arm64.ops": ["count_kernels"],
    "huse.benchmarks.arm64.probe": ["probe_versions"],
})
