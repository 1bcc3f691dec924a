"""The request inspector's memory: one ``Exchange`` per HTTP request seen on a client's tunnel,
kept in a ``RequestLog`` ring of the last ``max_requests``, with bodies captured up to
``body_limit`` bytes each, and the rows the inspector's page and its API show: ``summary()`` for the
list (``/api/requests``: no heads, no bodies), ``row()`` for one request (``/api/requests/ID``).
``RequestLog.generation`` counts every change, so a poll that saw the same count can skip the list."""

from __future__ import annotations

import collections
import time
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

__all__ = ["Exchange", "RequestLog", "MAX_REQUESTS", "BODY_LIMIT", "HEAD_LIMIT", "LIST_PATH_LIMIT",
           "REDACTED_HEADERS", "redact_head"]

#: Requests the inspector keeps (the oldest goes when a new one arrives).
MAX_REQUESTS = 200
#: Bytes of each request body and of each response body kept (as on the wire); the rest is only counted.
BODY_LIMIT = 16 * 1024
#: Largest request or response head the inspector reads; a connection with a bigger one is still
#: relayed untouched, but not recorded from there on.
HEAD_LIMIT = 32 * 1024
#: Characters of a request's path in a list row (``/api/requests``); its own row has it whole.
LIST_PATH_LIMIT = 1024
#: Header fields shown as ``[redacted]`` unless the inspector is made with ``redact=False``.
REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

#: Exchange states.
PENDING = "pending"          # the request is seen, its response not (yet)
DONE = "done"                # the whole response is seen
UPGRADED = "upgraded"        # 101 or a CONNECT tunnel: bytes after it are not HTTP
INCOMPLETE = "incomplete"    # the connection ended (or stopped being HTTP) before the response did


def redact_head(head: bytes, names: Iterable[str] = REDACTED_HEADERS) -> bytes:
    """``head`` with the values of the header fields ``names`` (lower case) replaced by ``[redacted]``
    (obs-fold continuation lines of such a field are dropped)."""
    lines = head.split(b"\r\n")
    out = lines[:1]
    hidden = False
    wanted = frozenset(n.encode() for n in names)
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and line.strip():
            if not hidden:
                out.append(line)
            continue
        name, sep, _ = line.partition(b":")
        hidden = bool(sep) and name.strip().lower() in wanted
        out.append(name + b": [redacted]" if hidden else line)
    return b"\r\n".join(out)


def _text(data: "bytes | bytearray") -> str:
    return data.decode("utf-8", "replace")


class Exchange:
    """One request and (once seen) its response, as relayed between a tunnel and the local service.
    Heads are kept as they were on the wire; bodies as on the wire (chunk framing included) up to
    the log's ``body_limit``."""

    __slots__ = ("id", "time", "started", "tunnel", "visitor", "local_addr", "proxy_protocol", "method",
                 "target", "request_head", "request_size", "request_body", "request_body_complete",
                 "upgrade", "status", "response_head", "response_size", "response_body", "duration", "state",
                 "replay_of", "_log")

    def __init__(self, request_id: int, tunnel: str, visitor: Optional[str], local_addr: Tuple[str, int],
                 proxy_protocol: Optional[str], method: str, target: str, head: bytes, upgrade: bool,
                 log: "RequestLog", replay_of: Optional[int] = None) -> None:
        self.id = request_id
        self.time = time.time()
        self.started = time.monotonic()
        self.tunnel = tunnel
        self.visitor = visitor
        self.local_addr = local_addr
        self.proxy_protocol = proxy_protocol
        self.method = method
        self.target = target
        self.request_head = head
        self.request_size = len(head)
        self.request_body = bytearray()
        self.request_body_complete = False
        self.upgrade = upgrade
        self.status: Optional[int] = None
        self.response_head = b""
        self.response_size = 0
        self.response_body = bytearray()
        self.duration: Optional[float] = None
        self.state = PENDING
        self.replay_of = replay_of
        self._log = log  # whose generation every change here counts up

    def __repr__(self) -> str:
        return f"<Exchange {self.id} {self.method} {self.target!r} {self.status} {self.state}>"

    # -- filled in by the tracker (each change counts up the log's generation)
    def request_body_data(self, data: memoryview) -> None:
        self._log.generation += 1
        self.request_size += len(data)
        room = self._log.body_limit - len(self.request_body)
        if room > 0:
            self.request_body += data[:room]

    def request_end(self) -> None:
        self._log.generation += 1
        self.request_body_complete = len(self.request_body) == self.request_size - len(self.request_head)

    def response_started(self, status: int, head: bytes) -> None:
        self._log.generation += 1
        self.status = status
        self.response_head = head
        self.response_size = len(head)

    def response_body_data(self, data: memoryview) -> None:
        self._log.generation += 1
        self.response_size += len(data)
        room = self._log.body_limit - len(self.response_body)
        if room > 0:
            self.response_body += data[:room]

    def finish(self, state: str) -> None:
        if self.state == PENDING:
            self._log.generation += 1
            self.state = state
            self.duration = time.monotonic() - self.started

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def replay_refusal(self) -> Optional[str]:
        """Why this request cannot be sent again, or None when it can."""
        if self.upgrade:
            return "an upgrade or CONNECT request is not replayed (what followed it was not HTTP)"
        if not self.request_body_complete:
            return "its body was not captured whole (bigger than the body limit, or cut short)"
        return None

    def summary(self) -> Dict[str, Any]:
        """The JSON row of the list (``/api/requests``): what the page's table shows, no heads and no
        bodies, and the path cut at ``LIST_PATH_LIMIT`` characters (``path_truncated`` says so)."""
        return {
            "id": self.id,
            "time": self.time,
            "tunnel": self.tunnel,
            "visitor": self.visitor,
            "method": self.method,
            "path": self.target[:LIST_PATH_LIMIT],
            "path_truncated": len(self.target) > LIST_PATH_LIMIT,
            "status": self.status,
            "duration_ms": None if self.duration is None else round(self.duration * 1000, 3),
            "request_size": self.request_size,
            "response_size": self.response_size,
            "state": self.state,
            "replay_of": self.replay_of,
            "replayable": self.replay_refusal is None,
        }

    def row(self, redact: bool, bodies: bool = False) -> Dict[str, Any]:
        """One request's JSON: the summary with the whole path and both heads (``/api/requests/ID``
        and a replay's answer; with ``bodies``: also the captured bodies as text)."""
        req_head, resp_head = self.request_head, self.response_head
        if redact:
            req_head, resp_head = redact_head(req_head), redact_head(resp_head)
        row = self.summary()
        row["path"], row["path_truncated"] = self.target, False
        row["request_head"] = _text(req_head)
        row["response_head"] = _text(resp_head)
        if bodies:
            row["request_body"] = _text(self.request_body)
            row["request_body_truncated"] = len(self.request_body) < self.request_size - len(self.request_head)
            row["response_body"] = _text(self.response_body)
            row["response_body_truncated"] = len(self.response_body) < self.response_size - len(self.response_head)
        return row


class RequestLog:
    """The last ``max_requests`` exchanges, oldest first; ids count up from 1 and are never reused.
    ``generation`` counts up on every change (a new request, one evicted, any change to one, clear)."""

    def __init__(self, max_requests: int = MAX_REQUESTS, body_limit: int = BODY_LIMIT) -> None:
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise ValueError(f"max_requests must be a whole number >= 1, got {max_requests!r}")
        if isinstance(body_limit, bool) or not isinstance(body_limit, int) or body_limit < 0:
            raise ValueError(f"body_limit must be a whole number of bytes >= 0, got {body_limit!r}")
        self.max_requests = max_requests
        self.body_limit = body_limit
        self.generation = 0
        self._ring: Deque[Exchange] = collections.deque(maxlen=max_requests)
        self._next = 1

    def __len__(self) -> int:
        return len(self._ring)

    def new(self, tunnel: str, visitor: Optional[str], local_addr: Tuple[str, int], proxy_protocol: Optional[str],
            method: str, target: str, head: bytes, upgrade: bool, replay_of: Optional[int] = None) -> Exchange:
        """Record a request whose head was just seen (the oldest one goes when the ring is full)."""
        ex = Exchange(self._next, tunnel, visitor, local_addr, proxy_protocol, method, target, head, upgrade,
                      self, replay_of)
        self._next += 1
        self._ring.append(ex)
        self.generation += 1
        return ex

    def get(self, request_id: int) -> Optional[Exchange]:
        for ex in self._ring:
            if ex.id == request_id:
                return ex
        return None

    def exchanges(self) -> List[Exchange]:
        """Newest first."""
        return list(reversed(self._ring))

    def clear(self) -> None:
        self._ring.clear()
        self.generation += 1
