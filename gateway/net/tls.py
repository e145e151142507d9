"""TLS for the terminal port (server side) and the host link (client side), with optional client
certificates (mTLS), on anyio's `TLSStream`, so both backends get the same behaviour.

Contexts are built once at start from the TOML's `[terminal_side.tls]` / `[host.tls]` tables: a file
that cannot be read, or a key that does not match its certificate, stops the start with the key's
name. The handshake runs where the caller can bound it and count it (`handshake`): a terminal that
presents no certificate, or one from another CA, and a host whose certificate does not chain to the
configured CA, are refused with one log line and a `gateway_tls_failures_total{side, kind}` count.

`standard_compatible=False` on both sides: neither CUP terminals nor ISO 8583 hosts exchange TLS
close_notify reliably, and the framing (lengths) already says where each message ends.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from gateway.config import ConfigError, TlsClientConfig, TlsServerConfig

_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_CERTS: Final = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsHandshakeError(OSError):
    """A TLS handshake failed; `kind` is one of metrics.TLS_FAILURE_KINDS (an OSError, so callers that treat a
    failed connect as "unreachable" treat this alike)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"TLS handshake failed ({kind}): {detail}")
        self.kind = kind


def server_context(cfg: TlsServerConfig, key: str = "terminal_side.tls") -> ssl.SSLContext:
    """The terminal port's context: our certificate and key; client certificates checked against
    `ca` when `client_certs` is "optional" or "required"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    _load_chain(ctx, cfg.cert, cfg.key, key)
    ctx.verify_mode = _CLIENT_CERTS[cfg.client_certs]
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca, f"{key}.ca")
    return ctx


def client_context(cfg: TlsClientConfig, key: str = "host.tls") -> ssl.SSLContext:
    """The host link's context: the host's certificate must chain to `ca` (else the system's trust
    store) and name the host; our own certificate when the host asks for one (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca, f"{key}.ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.cert is not None and cfg.key is not None:
        _load_chain(ctx, cfg.cert, cfg.key, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, private_key: Path, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: no such file {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{key}.cert/key: cannot load {cert} with {private_key}: {_reason(exc)}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {ca}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{key}: cannot load {ca}: {_reason(exc)}") from None


async def handshake(stream: anyio.abc.ByteStream, ctx: ssl.SSLContext, *, server_side: bool,
                    hostname: str | None = None) -> TLSStream:
    """Run the TLS handshake over `stream` (the caller bounds it in time). Raises TlsHandshakeError;
    the caller closes `stream` then."""
    try:
        return await TLSStream.wrap(stream, server_side=server_side, hostname=hostname, ssl_context=ctx,
                                    standard_compatible=False)
    except ssl.SSLError as exc:
        raise TlsHandshakeError(failure_kind(exc), _reason(exc)) from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        raise TlsHandshakeError("closed", f"the peer closed the connection ({type(exc).__name__})") from None


def failure_kind(exc: BaseException) -> str:
    """Map a TLS failure onto the metric's bounded `kind` values (metrics.TLS_FAILURE_KINDS)."""
    if isinstance(exc, TlsHandshakeError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_certificate"
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    if "DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return "no_certificate"
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return "bad_certificate"
    if "VERSION" in reason or "PROTOCOL" in reason or "HTTP_REQUEST" in reason or "WRONG" in reason:
        return "protocol"
    if isinstance(exc, ssl.SSLEOFError):
        return "closed"
    return "other"


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason without the file/line noise of the full message."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(getattr(exc, "reason", None) or exc)


def peer_summary(stream: TLSStream) -> str:
    """TLS version and the client certificate's subject common name, for the connection's log line."""
    version = stream.extra(TLSAttribute.tls_version, "?")
    cert = stream.extra(TLSAttribute.peer_certificate, None)
    if not cert:
        return f"{version}, no client certificate"
    names = [pair[1] for rdn in cert.get("subject", ()) for pair in rdn if pair[0] == "commonName"]
    return f"{version}, client certificate CN={names[0] if names else '?'}"
