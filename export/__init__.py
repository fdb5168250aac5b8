"""Export (needs the [export] extra): a training run to a verified ONNX bundle, its reduced-precision
variants, and the static TensorRT compatibility check. Public names load on first use.

    from huse.export import ExportOptions, export
"""

from huse.runtime._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "huse.export.api": ["ExportOptions", "export"],
    "huse.export.precision": ["accuracy_gate", "convert_fp16", "quantize_int8", "quantize_int8_cpu", "sensitive_nodes"],
    "huse.export.trt_compat": ["CompatIssue", "assert_trt_compat", "check_trt_compat", "qdq_issues"],
    "huse.export.onnx_graph": ["producers_consumers", "strip_unused_opsets"],
})
