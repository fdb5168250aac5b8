"""onnxruntime backend: CPU by default, CUDA when asked for and available."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from huse.runtime._lazy import lazy_import
from huse.runtime.backends.base import BaseRunner
from huse.runtime.errors import HuseError


class OnnxrtRunner(BaseRunner):
    """Runs an ONNX file with onnxruntime.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDAExecutionProvider, CPU fallback for unsupported ops).
        threads: intra-op threads; None lets onnxruntime use every core.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        super().__init__(path)
        self.device = device
        self.threads = threads
        self.session = None

    def activate(self) -> None:
        ort = lazy_import("onnxruntime", "ort")
        opts = ort.SessionOptions()
        # Full graph optimisation: ORT_DISABLE_ALL is 2-3x slower on these models.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise HuseError("onnxruntime has no CUDA provider here; install onnxruntime-gpu "
                                "or use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:
            raise HuseError(f"onnxruntime could not load {self.path} ({e})") from None
        super().activate()

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feed)
        return dict(zip(self.output_names, outputs))
