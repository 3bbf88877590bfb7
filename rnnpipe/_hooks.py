"""Run a function right after another package's module is imported, without importing it first.

``import rnnpipe`` must stay cheap (the CLI, every rank and Slurm job import it), but registering
rnnpipe's classes with ``transformers``' Auto classes needs ``transformers`` and torch loaded. So
the registration waits for the Auto modules themselves: :func:`after_import` runs it at once when
the module is already loaded, else right after the module executes. A failing callback never
breaks the import that triggered it: it is logged once, naming the module and its error.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

log = logging.getLogger("rnnpipe")


def _call(target: str, function: str) -> None:
    """``target.function()``; any failure is logged (with the module that failed), never raised."""
    try:
        getattr(importlib.import_module(target), function)()
    except Exception as e:
        log.warning(
            "rnnpipe: %s.%s() failed, so the Auto classes do not know rnnpipe: %s: %s",
            target,
            function,
            type(e).__name__,
            e,
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: it asks the finders after it for a watched module's spec
    and wraps that spec's ``exec_module`` so that the callbacks run once the module has executed."""

    def __init__(self) -> None:
        self.watched: dict[str, list[tuple[str, str]]] = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        callbacks = self.watched.get(fullname)
        if not callbacks:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, original = spec.loader, spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            for target_module, function in self.watched.pop(fullname, []):
                _call(target_module, function)

        loader.exec_module = exec_module  # type: ignore[method-assign] (this spec's own loader object)
        return spec


_FINDER = _AfterImport()


def after_import(module: str, target: str, function: str) -> None:
    """Call ``target.function()`` once ``module`` has been imported: now if it already has been."""
    if module in sys.modules:
        _call(target, function)
        return
    _FINDER.watched.setdefault(module, []).append((target, function))
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
