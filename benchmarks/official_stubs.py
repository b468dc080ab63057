"""Import stubs that let the official ``sam3d_objects`` modules load on a CPU machine without
their GPU-only dependencies (shared by ``make_official_manifest.py`` and ``parity_official.py``).

Only the packages in ``STUB_ROOTS`` are replaced; any attribute of a stubbed module is a class
that accepts and ignores its arguments, and the finder records which modules were touched so a
run can report them.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import types

#: optional packages of the official code that are never called by what we build (kaolin: rendering)
STUB_ROOTS = frozenset({"kaolin"})


class StubModule(types.ModuleType):
    """A package whose every attribute is an inert class."""

    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder serving :class:`StubModule` for ``STUB_ROOTS``; ``touched`` lists what loaded."""

    def __init__(self, roots: frozenset[str] = STUB_ROOTS) -> None:
        self.roots = roots
        self.touched: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.touched.add(spec.name)
        return StubModule(spec.name)

    def exec_module(self, module) -> None:
        pass
