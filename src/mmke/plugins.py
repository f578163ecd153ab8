"""Components from other installed packages, found through Python entry points, and where each came from.

A package adds components by naming, in an entry-point group (``mmke.methods``, ``mmke.model_families``,
``mmke.benchmarks``, ``mmke.metrics``, ``mmke.scorers``, ``mmke.protocols``, ``mmke.judges``), a module
(or an object in one) whose import registers them with the usual decorators (``@register_method`` …).
A registry loads its group after its built-in modules, the first time it is asked for a name
(``mmke.registry``). A plugin that fails to import is one warning and is skipped; a plugin that takes a
name already taken is a ``NameClashError`` naming both sources. See docs/writing_a_method.md.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from importlib import metadata

from mmke.errors import MmkeError

log = logging.getLogger(__name__)

#: The source of mmke's own components.
BUILTIN = "mmke"


class NameClashError(MmkeError, ValueError):
    """Two components (built-in or from plugins) claim one name of one registry."""


def load_group(group: str) -> None:
    """Import every entry point of ``group`` (in name order); one that fails is one warning line.

    A ``NameClashError`` is not a plugin's private failure: it says two packages disagree about a
    name, so it stops whatever asked for the name.
    """
    for ep in sorted(metadata.entry_points(group=group), key=lambda ep: (ep.name, ep.value)):
        try:
            ep.load()
        except NameClashError:
            raise
        except Exception as e:  # a broken plugin must not take mmke's own components down with it
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning(
                "%s plugin %r (%s, %s) failed to load and is skipped: %s",
                group,
                ep.name,
                _dist_source(ep.dist) or "no distribution",
                ep.value,
                reason,
            )


def registering_module(obj: object) -> str:
    """The module that registers ``obj`` now: the innermost module whose top-level code is running
    (the ``@register_method`` line in a plugin's module, even when it goes through a helper of mmke's,
    as metrics do), else, outside any import, the module that defines ``obj``.

    Why not ``obj.__module__`` alone: a plugin's metric is an instance of mmke's ``MetricSpec``.
    """
    frame = inspect.currentframe()
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "<module>" and name != "__main__":
            return name
        frame = frame.f_back
    return getattr(obj, "__module__", None) or "__main__"


def sources(modules: Iterable[str]) -> list[str]:
    """Where each module's components come from: ``mmke`` for mmke's own modules, ``DIST VERSION`` for
    an installed distribution's (a plugin), else the module's name (a script, a test, a bare path)."""
    modules = list(modules)
    shipped: dict[str, list[str]] = {}
    if any(_top(m) != BUILTIN for m in modules):  # reads every distribution's file list: only if needed
        shipped = metadata.packages_distributions()
    return [_source(m, shipped) for m in modules]


def _source(module: str, shipped: dict[str, list[str]]) -> str:
    if _top(module) == BUILTIN:
        return BUILTIN
    for name in shipped.get(_top(module), []):
        try:
            return _dist_source(metadata.distribution(name)) or module
        except metadata.PackageNotFoundError:
            continue
    return module


def _top(module: str) -> str:
    return module.partition(".")[0]


def _dist_source(dist: metadata.Distribution | None) -> str | None:
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"
