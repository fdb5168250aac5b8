"""The one interface every inference backend implements (Polygraphy's BaseRunner shape)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class BaseRunner:
    """Runs one model file.

    Use as a context manager; `infer` maps input names to arrays and returns output names to
    arrays (float32 unless the model says otherwise). Subclasses load heavy libraries lazily in
    `__init__`/`activate` through `huse.runtime._lazy.lazy_import`.

    Args:
        path: the model file (ONNX for onnxruntime, a serialised engine for TensorRT).
    """

    name = "base"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_active = False

    def activate(self) -> None:
        """Allocate the session/engine. Called by `__enter__`."""
        self.is_active = True

    def deactivate(self) -> None:
        """Release everything `activate` allocated. Called by `__exit__`."""
        self.is_active = False

    def __enter__(self) -> "BaseRunner":
        if not self.is_active:
            self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @property
    def input_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        raise NotImplementedError

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
