"""The ports-on-request extension ("remote-port/1"): a client asks for a public TCP port of its own.

It travels in the handshake's capabilities, so the request and its answer are settled before the
session starts:

* a client that wants a port announces ``remote-port/1=N`` (``N`` in 0..65535; 0 asks for any
  free port of the server's range). A client that does not want one announces nothing, so a Rust
  server, and any server when the client left the option unset, never sees it;
* a server that granted the port adds ``remote-port/1=PORT`` (the port it bound) to its
  HandshakeAck; one that cannot grant it refuses the handshake with the reason (out of range,
  taken, no range); a server that does not know the extension (a Rust one) answers without it,
  and the client then stops, saying so (it asked for something the server did not give).

What the peer sends is bounded: a capability string is at most ``MAX_CAPABILITY_LEN`` bytes
(``keep_capabilities``), and the value must be 1..5 ASCII digits naming a port in 0..65535;
anything else is read as no request at all."""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["REMOTE_PORT_CAPABILITY", "remote_port_capability", "parse_remote_port", "MAX_PORT"]

REMOTE_PORT_CAPABILITY = "remote-port/1"
MAX_PORT = 65535
_PREFIX = REMOTE_PORT_CAPABILITY + "="


def remote_port_capability(port: int) -> str:
    """The capability that asks for (client) or grants (server) ``port``."""
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"a port is in 0..{MAX_PORT}, got {port}")
    return f"{_PREFIX}{port}"


def parse_remote_port(capabilities: Sequence[str]) -> Optional[int]:
    """The port of the first well-formed ``remote-port/1=N`` in ``capabilities``; None without one."""
    for cap in capabilities:
        if not cap.startswith(_PREFIX):
            continue
        value = cap[len(_PREFIX):]
        if 0 < len(value) <= 5 and value.isascii() and value.isdigit() and int(value) <= MAX_PORT:
            return int(value)
    return None
