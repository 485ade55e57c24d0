"""Lazy re-exports for package ``__init__`` modules (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name is imported from its module on
    first use and cached in ``namespace`` (the package's ``globals()``). A name whose module is
    ``package.name`` is the submodule itself."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        imported = importlib.import_module(module)
        value = imported if module == f"{package}.{name}" else getattr(imported, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__


class _NamesakeModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def callable_as_namesake(module_name: str) -> None:
    """Calling the module ``a.b.tune`` calls its function ``tune``.

    ``gradwise.facts``, ``gradwise.tune`` and ``gradwise.deploy.export``, ``.bench`` and ``.serve``
    are each both a module and the function users call. Once such a module is imported, Python binds
    the parent's attribute to the module, so the module itself must be callable for
    ``gradwise.tune(...)`` to keep working.
    """
    sys.modules[module_name].__class__ = _NamesakeModule
