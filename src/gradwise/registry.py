"""Name -> factory registries (one decorator registers a model, a data set, a rule) and import paths."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Generic, TypeVar

from gradwise.errors import ConfigError, did_you_mean
from gradwise.trust import refuse_import

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A named collection of factories: ``@MODELS.register("mlp")`` adds one, ``MODELS["mlp"]`` gets it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return decorator

    def get(self, name: str, field: str | None = None) -> T:
        """The entry called ``name``; a ConfigError naming ``field`` with a did-you-mean otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries) or f"known: {', '.join(self)}"
            expected = f"a registered {self.kind} or an import path 'module:attr'"
            raise ConfigError(field or self.kind, name, expected, hint) from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def import_path(path: str, field: str = "import path", *, trusted: bool = True) -> Callable:
    """Resolve ``package.module:attr`` (or ``package.module.attr``) to the object it names.

    ``trusted=False`` (the name comes from a run, export or registry directory the user has not
    trusted) refuses every import path: see :mod:`gradwise.trust`. Trusted paths may name modules
    in the current directory, as with ``python -m``.
    """
    if not trusted:
        raise refuse_import(path, field)
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(field, path, "an import path like 'package.module:factory'")
    try:
        module = _import(module_name)
    except ImportError as exc:
        hint = f"importing {module_name!r} failed: {exc}"
        if isinstance(exc, ModuleNotFoundError) and _is_parent(exc.name, module_name):
            top = module_name.partition(".")[0]
            hint += f"; is {top}.py in the current directory or on PYTHONPATH?"
        raise ConfigError(field, path, "an importable module", hint) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = did_you_mean(part, [n for n in dir(obj) if not n.startswith("_")])
            raise ConfigError(field, path, f"an attribute of module {module_name!r}", hint)
        obj = getattr(obj, part)
    return obj


def _import(module_name: str) -> ModuleType:
    """Import a module; when it is not found, once more with the current directory on sys.path
    (appended, so installed packages keep their precedence)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
        if not _is_parent(exc.name, module_name) or cwd in on_path:
            raise
        sys.path.append(cwd)  # kept: DataLoader workers and pickles import the module again
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def _is_parent(name: str | None, module_name: str) -> bool:
    """Whether ``name`` is ``module_name`` or one of its packages (not a module it imports)."""
    return name is not None and (module_name == name or module_name.startswith(name + "."))


def resolve(registry: Registry[T], name: str, field: str, *, trusted: bool = True) -> T:
    """A registry entry by name, or any callable by import path (names containing ':').

    Registry names are always allowed; import paths only when ``trusted`` (see :func:`import_path`).
    """
    return import_path(name, field, trusted=trusted) if ":" in name else registry.get(name, field)
