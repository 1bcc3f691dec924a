"""``ferrotunnel client --config FILE.toml``: many tunnels from one file (stdlib ``tomllib``).

    server = "127.0.0.1:7835"
    token_file = "token.txt"          # or token = "..."
    [tls]                             # optional: TLS is on when the table is there
    ca = "certs/ca.pem"               # also: server_name, cert, key, skip_verify
    [[tunnel]]
    id = "web"
    local = "127.0.0.1:8000"
    [[tunnel]]
    id = "db"
    local = "127.0.0.1:5432"
    protocol = "tcp"                  # only at TCP ingresses ("http": only at HTTP/HTTPS ones)
    remote_port = 0                   # a port of its own from the server's range
    proxy_protocol = "v2"             # a PROXY header naming the visitor, to the local service
    allow = ["10.0.0.0/8"]            # visitor addresses allowed (CIDR); default: any
    # also: basic_auth = "user:secret" (HTTP visitors must send it), pool = true (share the id)

Relative paths are relative to the file. Unknown keys and bad values are usage errors that name
the file, the table (``tunnel[2]``, counted from 1) and the key; a token in the file is never
repeated in a message. Flags and environment variables win over the file (the command decides).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import UsageError

__all__ = ["ClientFile", "TunnelSpec", "TlsSpec", "load_client_file", "MAX_CONFIG_BYTES", "MAX_TUNNELS"]

#: A config file larger than this is refused before it is parsed.
MAX_CONFIG_BYTES = 1024 * 1024
#: At most this many ``[[tunnel]]`` tables (each is a connection of its own).
MAX_TUNNELS = 64

_TOP = {"server", "token", "token_file", "tls", "tunnel"}
_TLS = {"ca", "server_name", "cert", "key", "skip_verify"}
_TUNNEL = {"id", "local", "remote_port", "proxy_protocol", "protocol", "basic_auth", "allow", "pool"}


@dataclass(frozen=True)
class TunnelSpec:
    """One ``[[tunnel]]`` table: the tunnel id (None: the server picks one), the local service
    and the port asked of the server's range (None: none asked)."""

    id: Optional[str]
    local: Tuple[str, int]
    remote_port: Optional[int] = None
    #: "v1" or "v2": a PROXY header to the local service before each stream (None: none)
    proxy_protocol: Optional[str] = None
    #: "http" or "tcp": served only by that kind of ingress (None: both)
    protocol: Optional[str] = None
    #: "USER:PASSWORD" HTTP visitors must send (never shown)
    basic_auth: Optional[str] = field(default=None, repr=False)
    #: visitor networks allowed (CIDR; empty: any)
    allow: Tuple[str, ...] = ()
    #: serve the id together with other pool clients
    pool: bool = False

    def client_config(self) -> Any:
        """The ``ClientConfig`` of this tunnel (ValueError for settings that do not go together)."""
        from ..config import ClientConfig

        return ClientConfig(local_addr=self.local, remote_port=self.remote_port, proxy_protocol=self.proxy_protocol,
                            protocol=self.protocol, basic_auth=self.basic_auth, allow=self.allow, pool=self.pool)


@dataclass(frozen=True)
class TlsSpec:
    ca: Optional[str] = None
    server_name: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    skip_verify: bool = False


@dataclass(frozen=True)
class ClientFile:
    path: Path
    server: Optional[str]
    token: Optional[str]
    token_file: Optional[str]
    tls: Optional[TlsSpec]
    tunnels: Tuple[TunnelSpec, ...]

    def __repr__(self) -> str:  # never the token
        return f"<ClientFile {str(self.path)!r} server={self.server!r} tunnels={len(self.tunnels)}>"


class _Where:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, table: str, key: Optional[str], why: str) -> UsageError:
        at = f"{table}: " if table else ""
        name = f"key {key!r}: " if key else ""
        return UsageError(f"config file {self.path}: {at}{name}{why}")


def _unknown(where: _Where, table: str, data: Dict[str, Any], allowed: set) -> None:
    for key in data:
        if key not in allowed:
            raise where.fail(table, key, f"unknown key (known: {', '.join(sorted(allowed))})")


def _text(where: _Where, table: str, data: Dict[str, Any], key: str, secret: bool = False) -> Optional[str]:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        shown = "" if secret else f", got {value!r}"
        raise where.fail(table, key, f"must be a non-empty string{shown}")
    return value


def _path(where: _Where, table: str, data: Dict[str, Any], key: str) -> Optional[str]:
    value = _text(where, table, data, key)
    if value is None:
        return None
    full = Path(value) if os.path.isabs(value) else where.path.parent / value
    if not full.is_file():
        raise where.fail(table, key, f"file not found: {full}")
    return str(full)


def _address(where: _Where, table: str, data: Dict[str, Any], key: str) -> Optional[Tuple[str, int]]:
    from ..client.client import parse_address

    value = _text(where, table, data, key)
    if value is None:
        return None
    if "://" in value:
        raise where.fail(table, key, f"must be HOST:PORT without a scheme (e.g. 127.0.0.1:7835), got {value!r}")
    try:
        return parse_address(value)
    except ValueError:
        raise where.fail(table, key, f"must be HOST:PORT (e.g. 127.0.0.1:8000), got {value!r}") from None


def _access(where: _Where, table: str, t: Dict[str, Any]) -> Tuple[Optional[str], Optional[str], Tuple[str, ...], bool]:
    from ..access import check_basic_auth_value, parse_networks

    protocol = t.get("protocol")
    if protocol is not None and protocol not in ("http", "tcp"):
        raise where.fail(table, "protocol", f"must be \"http\" or \"tcp\", got {protocol!r}")
    auth = _text(where, table, t, "basic_auth", secret=True)
    if auth is not None:
        try:
            check_basic_auth_value(auth)
        except ValueError as exc:
            raise where.fail(table, "basic_auth", str(exc)) from None
    allow = t.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise where.fail(table, "allow", "must be a list of CIDR strings, e.g. [\"10.0.0.0/8\"]")
    try:
        parse_networks(allow)
    except ValueError as exc:
        raise where.fail(table, "allow", str(exc)) from None
    pool = t.get("pool", False)
    if not isinstance(pool, bool):
        raise where.fail(table, "pool", f"must be true or false, got {pool!r}")
    return protocol, auth, tuple(allow), pool


def load_client_file(path: str) -> ClientFile:
    """Read and check a client config file; UsageError (exit 2) for anything wrong with it."""
    where = _Where(Path(path))
    try:
        with open(path, "rb") as f:  # read, not stat: a pipe or a device has no size to check first
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise where.fail("", None, f"over the {MAX_CONFIG_BYTES}-byte limit")
        data = tomllib.loads(raw.decode())
    except OSError as exc:
        raise UsageError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise where.fail("", None, f"not valid TOML ({exc})") from None
    except RecursionError:  # (tomllib parses nested arrays and tables recursively)
        raise where.fail("", None, "not valid TOML here: arrays or tables nested too deeply") from None
    except UnicodeDecodeError as exc:  # (TOML is UTF-8; the byte's value and place, not the text)
        raise where.fail("", None, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                   f"{exc.start}); TOML files are UTF-8") from None
    _unknown(where, "", data, _TOP)
    server = _text(where, "", data, "server")
    if server is not None:
        _address(where, "", data, "server")
    token = _text(where, "", data, "token", secret=True)
    token_file = _path(where, "", data, "token_file")
    if token is not None and token_file is not None:
        raise where.fail("", "token", "give token or token_file, not both")
    tls: Optional[TlsSpec] = None
    if "tls" in data:
        t = data["tls"]
        if not isinstance(t, dict):
            raise where.fail("", "tls", "must be a table ([tls])")
        _unknown(where, "tls", t, _TLS)
        skip = t.get("skip_verify", False)
        if not isinstance(skip, bool):
            raise where.fail("tls", "skip_verify", f"must be true or false, got {skip!r}")
        tls = TlsSpec(ca=_path(where, "tls", t, "ca"), server_name=_text(where, "tls", t, "server_name"),
                      cert=_path(where, "tls", t, "cert"), key=_path(where, "tls", t, "key"), skip_verify=skip)
        if (tls.cert is None) != (tls.key is None):
            raise where.fail("tls", "cert" if tls.cert is None else "key", "cert and key go together")
    raw = data.get("tunnel", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise where.fail("", "tunnel", "must be tables ([[tunnel]])")
    if not raw:
        raise where.fail("", "tunnel", "no [[tunnel]] table: name at least one tunnel")
    if len(raw) > MAX_TUNNELS:
        raise where.fail("", "tunnel", f"{len(raw)} tunnels, over the limit of {MAX_TUNNELS}")
    tunnels: List[TunnelSpec] = []
    seen: Dict[str, int] = {}
    for i, t in enumerate(raw, 1):
        table = f"tunnel[{i}]"
        _unknown(where, table, t, _TUNNEL)
        tid = _text(where, table, t, "id")
        local = _address(where, table, t, "local")
        if local is None:
            raise where.fail(table, "local", "missing: the local service as HOST:PORT")
        port = t.get("remote_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise where.fail(table, "remote_port", f"must be a port in 0..65535, got {port!r}")
        proxy = t.get("proxy_protocol")
        if proxy is not None and proxy not in ("v1", "v2"):
            raise where.fail(table, "proxy_protocol", f"must be \"v1\" or \"v2\", got {proxy!r}")
        spec = TunnelSpec(tid, local, port, proxy, *_access(where, table, t))
        try:
            spec.client_config()
        except ValueError as exc:  # settings that do not go together (the message names no secret)
            raise where.fail(table, None, str(exc)) from None
        if tid is not None:
            if tid.lower() in seen:
                raise where.fail(table, "id", f"{tid!r} is also the id of tunnel[{seen[tid.lower()]}]")
            seen[tid.lower()] = i
        tunnels.append(spec)
    return ClientFile(where.path, server, token, token_file, tls, tuple(tunnels))
