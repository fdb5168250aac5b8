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


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """`__all__`, `__getattr__` and `__dir__` for a package whose public names load on first use (PEP 562).

    A stage package (huse.train, huse.export, huse.benchmarks) states what it offers without
    importing torch or onnx when only its CLI module or one light helper is imported.

    Args:
        package: the package's `__name__`.
        exports: module -> the public names it defines.
    Returns:
        (__all__, __getattr__, __dir__) to assign at the package's top level.
    """
    where = {name: module for module, names in exports.items() for name in names}
    public = sorted(where)

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}; it offers {public}")
        return getattr(importlib.import_module(where[name]), name)

    return public, __getattr__, lambda: public
