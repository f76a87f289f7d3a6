"""One small plug-in registry for every kind of plug-in: kernels, estimators, quantizers, solvers, dashboard views,
command-line commands.

A :class:`Registry` maps names to plug-ins (usually classes) and is filled by decorators (``@SOLVERS.register``,
re-exported by each stage as ``register_solver`` and so on). Plug-ins that live outside mpq arrive through Python
entry points: a package declares, in its ``pyproject.toml``::

    [project.entry-points."mpq.solvers"]
    my_solver = "my_package.solvers"          # a module whose import registers its plug-ins
    other = "my_package.other:OtherSolver"     # or one object, registered under its ``name``

and its plug-ins appear the first time a registry of that group is asked for a name. The core never imports a stage
package by name: mpq's own stages are found the same way (its ``pyproject.toml`` declares them), and only while that
metadata is missing (a source checkout that was not installed) does :data:`BUILTIN_PLUGINS` stand in for it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from importlib import metadata
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from mpq.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Entry-point groups of mpq's own stages. Used only when the installed distribution does not declare them
# (see the module docstring); the pyproject's [project.entry-points] lists the same modules.
BUILTIN_PLUGINS: dict[str, tuple[str, ...]] = {
    "mpq.kernels": ("mpq.kernels",),
    "mpq.estimators": ("mpq.sensitivity",),
    "mpq.solvers": ("mpq.solvers",),
    "mpq.quantizers": ("mpq.quantizers",),
    "mpq.views": ("mpq.dashboards.views",),
    "mpq.commands": ("mpq.cli_commands", "mpq.export.cli"),
}

_loaded_groups: set[str] = set()


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=group))


def load_plugins(group: str) -> None:
    """Import every plug-in module of an entry-point group once (mpq's own, then third parties')."""
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    points = _entry_points(group)
    declared_by_mpq = any((p.dist is not None and p.dist.name == "mpq") for p in points)
    if not declared_by_mpq:
        for module in BUILTIN_PLUGINS.get(group, ()):
            importlib.import_module(module)
    for point in points:
        try:
            loaded = point.load()
        except Exception as e:  # a broken third-party plug-in must not take mpq down with it
            log.warning("plug-in %r of %s (%s) failed to load: %s", point.name, group, point.value, e)
            continue
        _register_loaded(group, point, loaded)


_REGISTRIES: dict[str, Registry] = {}


def _register_loaded(group: str, point: metadata.EntryPoint, loaded: Any) -> None:
    """An entry point that names an object (not a module) is registered under its ``name`` attribute, or under
    the entry point's name."""
    if inspect.ismodule(loaded):
        return
    registry = _REGISTRIES.get(group)
    if registry is None:
        return
    name = getattr(loaded, "name", None) or point.name
    if name not in registry._items:
        registry.add(name, loaded)


class Registry(Generic[T]):
    """Names -> plug-ins of one kind, filled by :meth:`register` and by the entry points of ``group``."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        _REGISTRIES[group] = self

    def add(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} plug-in needs a non-empty string name, got {name!r}")
        previous = self._items.get(name)
        if previous is not None and previous is not item:
            log.warning("%s %r registered again: %r replaces %r", self.kind, name, item, previous)
        self._items[name] = item
        return item

    def remove(self, name: str) -> T | None:
        """Unregister ``name`` (tests that register a plug-in for themselves clean up with this)."""
        return self._items.pop(name, None)

    def register(self, item: T | None = None, *, name: str | None = None) -> Any:
        """Decorator: ``@REG.register`` (the item's ``name`` attribute) or ``@REG.register(name="x")``."""
        def decorate(obj: T) -> T:
            self.add(name or getattr(obj, "name"), obj)
            return obj

        return decorate if item is None else decorate(item)

    def _load(self) -> None:
        load_plugins(self.group)

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``; a :class:`~mpq.errors.ConfigError` names the ones there are."""
        self._load()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or 'none'}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"


def accepted_options(factory: Callable[..., Any]) -> tuple[list[str], bool]:
    """The keyword arguments ``factory`` (a class or function) accepts, and whether it also takes ``**kwargs``."""
    if inspect.isclass(factory) and factory.__init__ is object.__init__:
        return [], False  # a class without options
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(factory) and params and params[0].name == "self":
        params = params[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def check_options(kind: str, name: str, factory: Callable[..., Any], options: Mapping[str, Any],
                  exclude: Iterable[str] = ()) -> None:
    """Raise a :class:`~mpq.errors.ConfigError` naming every key of ``options`` that ``factory`` does not take,
    and the keys it does."""
    allowed, takes_any = accepted_options(factory)
    allowed = [a for a in allowed if a not in set(exclude)]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise ConfigError(f"{kind} {name!r} has no option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; its options: {', '.join(allowed) or 'none'}")


# The registries of the plug-in kinds whose base classes the stages define (kernels register in
# mpq.kernel_registry, quantizers in mpq.quantizers; both load their entry points through load_plugins).
ESTIMATORS: Registry = Registry("sensitivity estimator", "mpq.estimators")
SOLVERS: Registry = Registry("solver", "mpq.solvers")
VIEWS: Registry = Registry("dashboard view", "mpq.views")
COMMANDS: Registry = Registry("command", "mpq.commands")

__all__ = ["Registry", "load_plugins", "accepted_options", "check_options", "BUILTIN_PLUGINS", "ESTIMATORS",
           "SOLVERS", "VIEWS", "COMMANDS"]
