"""Lazy import of heavy optional modules (Polygraphy's `mod.lazy_import` habit)."""

from __future__ import annotations

import importlib
from types import ModuleType

from huse.runtime.errors import HuseError


def lazy_import(module: str, extra: str) -> ModuleType:
    """Import `module` now, or raise a HuseError that says which extra installs it.

    Args:
        module: dotted module name, e.g. "onnxruntime".
        extra: the huse-edge extra that provides it, e.g. "ort".
    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken native library (OSError, RuntimeError)
        raise HuseError(
            f"{module} is needed here but could not be imported ({type(e).__name__}: {e}); "
            f"install it with `pip install 'huse-edge[{extra}]'`"
        ) from e
