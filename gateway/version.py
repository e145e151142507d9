"""What `gateway --version` prints: the gateway's version, the Python running it, the event loops it
can run on and the codec in use: the facts a bug report or a benchmark needs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

from gateway import __version__


def _installed(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def backends() -> list[str]:
    """The anyio backends this installation can run, with the versions of their event loops."""
    found = []
    uvloop = _installed("uvloop")
    found.append(f"asyncio (uvloop {uvloop})" if uvloop else "asyncio (no uvloop: the standard loop)")
    trio = _installed("trio")
    if trio:
        found.append(f"trio {trio}")
    return found


def version_report() -> str:
    from gateway.iso.codec import codec_implementation

    python = f"{platform.python_implementation()} {platform.python_version()}"
    return "\n".join([
        f"gateway {__version__}",
        f"python {python} ({sys.executable})",
        f"anyio {_installed('anyio')}: backends {', '.join(backends())}",
        f"codec {codec_implementation()}",
    ])
