"""Lazy attribute resolution for package ``__init__`` modules (PEP 562)."""
import importlib


def lazy_getattr(package: str, exports: dict, namespace: dict):
    """A module ``__getattr__`` that imports ``exports[name]`` on first use and caches the value in
    ``namespace`` (the package's globals), so later lookups are plain attribute reads."""

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
