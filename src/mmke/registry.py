"""One lazy registry for every pluggable component (benchmarks, families, methods, metrics, build steps,
bundled models, judge backends).

Components register themselves with a decorator in their own module. A registry imports
the modules of its home package only when it is first asked for a name, so ``mmke list``
never pays for importing torch unless a component needs it; then the entry points of its
group, through which other installed packages add components (``mmke.plugins``). Every name
remembers where it came from: ``source(name)`` is ``mmke`` or the plugin's ``DIST VERSION``.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mmke import plugins
from mmke.errors import UnknownNameError

T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Names -> components of one kind, filled by ``@registry.register(name)``."""

    kind: str
    package: str
    #: Packages whose public modules also register here (a component that lives with its own kind).
    more_packages: tuple[str, ...] = ()
    #: The entry-point group other installed packages add components through ("" for none).
    group: str = ""
    _items: dict[str, T] = field(default_factory=dict)
    _help: dict[str, str] = field(default_factory=dict)
    #: The module that registered each name: what ``source`` tells the user.
    _modules: dict[str, str] = field(default_factory=dict)
    _loaded: bool = False

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def add(obj: T) -> T:
            module = plugins.registering_module(obj)
            if name in self._items and self._items[name] is not obj:
                raise plugins.NameClashError(self._clash(name, module))
            self._items[name] = obj
            self._modules[name] = module
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return add

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self._miss_message(name)) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def declared(self) -> list[str]:
        """The names in the order they were registered (e.g. metrics: their column order)."""
        self._load()
        return list(self._items)

    def describe(self) -> Iterator[tuple[str, str]]:
        for name in self.names():
            yield name, self._help.get(name, "")

    def source(self, name: str) -> str:
        """Where ``name`` comes from: ``mmke`` for a built-in, ``DIST VERSION`` for a plugin's."""
        self.get(name)  # an unknown name is the usual error
        return plugins.sources([self._module_of(name)])[0]

    def listing(self) -> list[tuple[str, str, str]]:
        """``(name, source, help)`` per name, sorted: the rows of ``mmke list``."""
        names = self.names()
        found = plugins.sources(self._module_of(n) for n in names)
        return [(n, src, self._help.get(n, "")) for n, src in zip(names, found, strict=True)]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def _module_of(self, name: str) -> str:
        # a name put in ``_items`` by hand (tests) has no module: it is nobody's plugin
        return self._modules.get(name, plugins.BUILTIN)

    def _clash(self, name: str, module: str) -> str:
        first, second = plugins.sources([self._module_of(name), module])
        return f"{self.kind} {name!r} is registered twice: by {first} and by {second}"

    def _miss_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(self._items)) or "none"
        return f"unknown {self.kind} {name!r}{hint} (known: {known})"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package in (self.package, *self.more_packages):
            pkg = importlib.import_module(package)
            paths = getattr(pkg, "__path__", None)
            if paths is None:  # a plain module registers on import
                continue
            for mod in pkgutil.walk_packages(paths, prefix=f"{package}."):
                if not mod.name.rsplit(".", 1)[-1].startswith("_"):
                    importlib.import_module(mod.name)
        if self.group:  # after the built-ins, so a plugin that takes a built-in's name is the one refused
            plugins.load_group(self.group)


# The world registers its benchmark reader and its build steps from its own package.
benchmarks: Registry = Registry(
    "benchmark", "mmke.data.formats", more_packages=("mmke.data.world",), group="mmke.benchmarks"
)
model_families: Registry = Registry("model family", "mmke.models.families", group="mmke.model_families")
methods: Registry = Registry("method", "mmke.methods", group="mmke.methods")
metrics: Registry = Registry("metric", "mmke.eval.metrics", group="mmke.metrics")
scorers: Registry = Registry("scorer", "mmke.models.scoring", group="mmke.scorers")
protocols: Registry = Registry("protocol", "mmke.eval.protocols", group="mmke.protocols")
#: Judge backends by the scheme of ``judge=SCHEME:TARGET`` (``local``, ``http``).
judges: Registry = Registry("judge backend", "mmke.eval.judge", group="mmke.judges")
build_steps: Registry = Registry("build step", "mmke.data.build", more_packages=("mmke.data.world",))
bundled_models: Registry = Registry("bundled model", "mmke.bundled")
#: Original (non-transformers) checkpoint layouts ``mmke convert-model`` reads.
checkpoint_kinds: Registry = Registry("checkpoint kind", "mmke.models.convert")

register_benchmark = benchmarks.register
register_family = model_families.register
register_method = methods.register
register_metric = metrics.register
register_scorer = scorers.register
register_protocol = protocols.register
register_judge = judges.register
register_step = build_steps.register
register_bundled = bundled_models.register
register_checkpoint_kind = checkpoint_kinds.register
