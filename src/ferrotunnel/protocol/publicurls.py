"""The public-URLs extension ("public-urls/1"): the server tells a client where visitors reach it.

Right after accepting a handshake, a server that knows its public addresses sends one
``PluginData`` with plugin id ``ft.urls/1``. Its payload is a list of URLs, each
``http://ID.DOMAIN:PORT``, ``http://HOST:PORT`` (routed by ``Host: ID``) or ``tcp://HOST:PORT``::

    count:u8, then count times (length:u16 big-endian, URL bytes: printable ASCII)

Everything the peer sends is bounded (``MAX_PUBLIC_URLS`` URLs of at most ``MAX_URL_LEN`` bytes);
a malformed payload, a second one, or one sent by a client is ignored with a debug log, never an
error: the session works the same without it. A Rust peer never announces the capability, so it
never sees the frame."""

from __future__ import annotations

import logging
import struct
from typing import Any, Iterable, Optional, Tuple

from ..frames import PluginData
from .extensions import PUBLIC_URLS_PLUGIN_ID, Negotiated
from .listener import CoreListener

__all__ = ["PublicUrlsMixin", "encode_public_urls", "decode_public_urls", "MAX_PUBLIC_URLS", "MAX_URL_LEN",
           "URL_SCHEMES"]

log = logging.getLogger("ferrotunnel.core")

#: At most this many URLs per session, each at most this many bytes (a 63-byte DNS label, a
#: 253-byte domain and a port fit with room to spare).
MAX_PUBLIC_URLS = 16
MAX_URL_LEN = 400
URL_SCHEMES = ("http://", "https://", "tcp://")
_LEN = struct.Struct(">H")
_MAX_PAYLOAD = 1 + MAX_PUBLIC_URLS * (_LEN.size + MAX_URL_LEN)


def _valid(url: str) -> bool:
    # printable ASCII only: a URL goes to the user's terminal, where control bytes could act
    return (0 < len(url) <= MAX_URL_LEN and url.isascii() and url.isprintable() and " " not in url
            and url.startswith(URL_SCHEMES))


def encode_public_urls(urls: Iterable[str]) -> bytes:
    """The payload for ``urls``: invalid ones are left out, and at most ``MAX_PUBLIC_URLS`` kept."""
    kept = [u for u in urls if _valid(u)][:MAX_PUBLIC_URLS]
    out = bytearray((len(kept),))
    for url in kept:
        raw = url.encode("ascii")
        out += _LEN.pack(len(raw))
        out += raw
    return bytes(out)


def decode_public_urls(data: Any) -> Tuple[str, ...]:
    """The URLs of a payload; ValueError saying what is wrong if anything is."""
    if len(data) > _MAX_PAYLOAD:  # checked before copying anything
        raise ValueError(f"{len(data)} bytes, more than {_MAX_PAYLOAD}")
    raw = bytes(data)
    if not raw:
        raise ValueError("empty payload")
    count, pos = raw[0], 1
    if count > MAX_PUBLIC_URLS:
        raise ValueError(f"{count} URLs, more than {MAX_PUBLIC_URLS}")
    urls = []
    for _ in range(count):
        if pos + _LEN.size > len(raw):
            raise ValueError("truncated")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += _LEN.size
        if n > MAX_URL_LEN or pos + n > len(raw):
            raise ValueError(f"a URL of {n} bytes (at most {MAX_URL_LEN}, and within the payload)")
        try:
            url = raw[pos:pos + n].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("a URL that is not ASCII") from None
        if not _valid(url):
            raise ValueError(f"not a printable http://, https:// or tcp:// URL: {url[:60]!r}")
        urls.append(url)
        pos += n
    if pos != len(raw):
        raise ValueError(f"{len(raw) - pos} bytes after the last URL")
    return tuple(urls)


class PublicUrlsMixin:
    """The public-URLs extension's part of ``SessionCore``."""

    is_client: bool
    closed: bool
    negotiated: Negotiated
    listener: CoreListener
    #: Client: where visitors reach this session's tunnel, as the server said (empty until then,
    #: and for good when the server does not negotiate the extension or knows no address).
    public_urls: Tuple[str, ...] = ()
    _urls_seen = False

    def _control(self, frame: Any) -> None:  # pragma: no cover - SessionCore's
        raise NotImplementedError

    def on_public_urls(self, data: Any) -> None:
        """PluginData of the public-URLs extension (see the module doc)."""
        if not self.is_client:
            log.debug("ignoring public URLs sent by a client")
            return
        if self._urls_seen:
            log.debug("ignoring a second list of public URLs")
            return
        try:
            urls = decode_public_urls(data)
        except ValueError as exc:
            log.debug("ignoring a malformed list of public URLs: %s", exc)
            return
        self._urls_seen = True
        self.public_urls = urls
        # the client's connection reports them; a listener without the method (a test's, or the
        # null listener of a closed session) does not need them
        received: Optional[Any] = getattr(self.listener, "public_urls_received", None)
        if received is not None:
            received(urls)

    def send_public_urls(self, urls: Iterable[str]) -> bool:
        """Server: tell the client where visitors reach it. False when the client did not negotiate
        the extension or the session is closed."""
        if self.is_client or self.closed or "public_urls" not in self.negotiated:
            return False
        self._control(PluginData(PUBLIC_URLS_PLUGIN_ID, encode_public_urls(urls)))
        return True
