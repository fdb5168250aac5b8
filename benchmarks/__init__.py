"""Benchmarks (needs the [bench] extra): the huse-bench suite, its report and the result comparison.
Public names load on first use.

    from huse.benchmarks import BenchConfig, run_suite, write_outputs
"""

from huse.runtime._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "huse.benchmarks.suite": ["BenchConfig", "run_suite", "write_outputs"],
    "huse.benchmarks.compare": ["compare", "format_compare", "load_result", "validate_result"],
    "huse.benchmarks.report": ["plot", "to_markdown"],
    "huse.benchmarks.machine": ["machine_info"],
})
