"""What the load tool drives: the `Driver`/`Session` protocols and a small registry of driver factories.

A driver factory takes the parsed options (a plain dict: `target`, `options` from `-o KEY=VALUE`, every
other CLI option, and `worker_index`/`worker_count`, so a driver can keep identities such as terminal ids
distinct per worker process) and returns a `Driver`. Factories are registered by name, either as a
callable or lazily as an import reference "package.module:function"; `--driver package.module:function`
works without registering. Worker processes rebuild their driver from the factory's import reference, so
a factory must be a module-level function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable


class LoadError(Exception):
    """A load run that cannot start or finish as configured (bad options, unknown driver, target down)."""


@runtime_checkable
class Session(Protocol):
    """One client connection (a terminal). Used by one request at a time.

    Optional: `async def prepare(self) -> None` (e.g. sign-in), awaited once after `connect` and before
    measurement starts (and again for a replacement session). A request may be cancelled by the runner's
    per-request timeout; the session is then closed and never used again, so `request` need not leave
    it in a usable state.
    """

    async def request(self, kind: str) -> str:
        """Perform one request of `kind`; return its result code ("00" = success). Raise on a transport
        error: the session is then closed and a new one connected."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Driver(Protocol):
    """Makes sessions. Optional: `async def aclose(self) -> None`, awaited once when the run is over."""

    async def connect(self) -> Session: ...


DriverFactory = Callable[[Mapping[str, Any]], Driver]

#: name → factory, or "module:function" resolved on first use (keeps imports lazy)
_REGISTRY: dict[str, DriverFactory | str] = {
    "echo": "gateway.load.echo:echo_driver_factory",
    "cup": "gateway.sim.cup_driver:cup_driver_factory",
}


def register_driver(name: str, factory: DriverFactory | str) -> None:
    """Make `--driver NAME` use `factory` (a module-level callable or a "module:function" reference)."""
    _REGISTRY[name] = factory


def driver_names() -> list[str]:
    return sorted(_REGISTRY)


def factory_reference(factory: DriverFactory) -> str:
    """The "module:qualname" a worker process imports to get `factory` back."""
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise LoadError(f"driver factory {factory!r} is not a module-level function: worker processes "
                        "cannot import it")
    return f"{module}:{qualname}"


def resolve_reference(ref: str) -> DriverFactory:
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise LoadError(f"driver reference {ref!r} is not of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise LoadError(f"cannot load driver factory {ref!r}: {exc}") from None
    if not callable(obj):
        raise LoadError(f"driver factory {ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def lookup_factory(name: str) -> tuple[DriverFactory, str]:
    """The factory for a registered name or a "module:function" reference, and its import reference."""
    entry = _REGISTRY.get(name)
    if entry is None:
        if ":" not in name:
            raise LoadError(f"unknown driver {name!r}; known: {', '.join(driver_names())} "
                            "(or give 'package.module:function')")
        entry = name
    if isinstance(entry, str):
        return resolve_reference(entry), entry
    return entry, factory_reference(entry)


def parse_target(target: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as "[::1]:PORT") → (host, port)."""
    host, sep, port_text = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LoadError(f"target {target!r} is not HOST:PORT")
    return host, int(port_text)
