"""The backend registry: a backend is one file plus one registration.

A dispatcher or experts class registers itself with a decorator in its own file:

    @register_dispatcher("alltoall")
    class AllToAllDispatcher(CommDispatcher): ...

Importing `epmoe` imports the built-in backends (`epmoe.dispatch`, `epmoe.experts`), so they are
registered before anything asks for one; the contract, `epmoe info`, the CLI, the benchmarks and the
tests enumerate these dicts instead of lists of names. A backend that runs only somewhere declares it in
its `CAPS` (`devices`, `available`); the contract refuses it elsewhere with the reason.
This module imports nothing from epmoe, so anything may import it.
"""
from __future__ import annotations

DISPATCHERS: dict[str, type] = {}   # name -> class, in registration order
EXPERTS: dict[str, type] = {}


def _register(table: dict, kind: str, name: str):
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_{kind}: the name must be a non-empty string other than 'auto', got {name!r}")

    def decorate(cls):
        if not hasattr(cls, "CAPS"):
            raise TypeError(f"register_{kind}({name!r}): {cls.__name__} declares no CAPS")
        known = table.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"register_{kind}: {name!r} is already registered to {known.__name__}")
        cls.name = name
        table[name] = cls
        return cls
    return decorate


def register_dispatcher(name: str):
    """Class decorator: make a `Dispatcher` subclass available under `name`."""
    return _register(DISPATCHERS, "dispatcher", name)


def register_experts(name: str):
    """Class decorator: make an `Experts` subclass available under `name`."""
    return _register(EXPERTS, "experts", name)


def unregister(name: str) -> None:
    """Remove a backend registered under `name` (tests that add a temporary one)."""
    DISPATCHERS.pop(name, None)
    EXPERTS.pop(name, None)
