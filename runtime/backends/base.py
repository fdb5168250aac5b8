"""The one interface every inference backend implements (Polygraphy's BaseRunner shape)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from huse.runtime.errors import HuseError

__all__ = ["BaseRunner"]


class BaseRunner:
    """Runs one model file.

    Use as a context manager; `infer` maps input names to arrays and returns output names to
    arrays (float32 unless the model says otherwise). As in Polygraphy, the public methods hold
    the lifetime checks and subclasses override only the `*_impl` hooks: `activate_impl`
    (load heavy libraries through `huse.runtime._lazy.lazy_import`, allocate), `deactivate_impl`
    (release) and `infer_impl` (run one batch).

    Args:
        path: the model file (ONNX for onnxruntime, a serialised engine for TensorRT).
    """

    name = "base"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_active = False

    def activate(self) -> None:
        """Allocate the session/engine (`activate_impl`). Called by `__enter__`; a no-op when active."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        """Release everything `activate` allocated (`deactivate_impl`). Called by `__exit__`."""
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    def __enter__(self) -> "BaseRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _require_active(self) -> None:
        if not self.is_active:
            raise HuseError(f"{type(self).__name__} for {self.path} is not active; "
                            f"use it as `with {type(self).__name__}(path) as runner:` or call activate()")

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (`infer_impl`) on an active runner.

        Args:
            feed: input name -> array (batch first).
        Returns:
            Output name -> array.
        Raises:
            HuseError: the runner is not active.
        """
        self._require_active()
        return self.infer_impl(feed)

    @property
    def input_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        raise NotImplementedError

    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
