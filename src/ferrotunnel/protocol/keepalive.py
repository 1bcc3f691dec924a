"""Liveness of the peer and heartbeats: who sends them, the round trip, and the session timeout.

Time we ourselves did not read (reading paused for backpressure or a rate limit) is not the
peer's silence, so it is not counted against ``session_timeout``. A pause of ours that itself
lasts longer than ``session_timeout`` ends the session: whatever holds it (a reader that stopped,
a peer that does not take our replies) has had the whole timeout to move.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional, Tuple

from ..errors import TunnelTimeoutError

__all__ = ["Keepalive"]

#: Unanswered heartbeats remembered for the round-trip measurement.
MAX_OUTSTANDING = 8


class Keepalive:
    __slots__ = ("interval", "timeout", "sends", "last_seen", "paused_at", "next_heartbeat", "sent", "rtt")

    def __init__(self, interval: float, timeout: float, sends_heartbeats: bool, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.sends = sends_heartbeats
        self.last_seen = now
        self.paused_at: Optional[float] = None
        self.next_heartbeat = now  # the first one goes out at once, as the Rust client does
        self.sent: Deque[float] = deque()
        #: Heartbeat round trip in seconds (send to ack), None until one was measured.
        self.rtt: Optional[float] = None

    def seen(self, now: float) -> None:
        self.last_seen = now

    def acked(self, now: float) -> None:
        if self.sent:
            self.rtt = now - self.sent.popleft()

    def tick(self, now: float) -> Tuple[bool, float]:
        """(send a heartbeat now?, when to tick next). Raises TunnelTimeoutError for a dead peer."""
        if self.paused_at is None and now - self.last_seen > self.timeout:
            raise TunnelTimeoutError(
                f"no frame from the peer for {now - self.last_seen:.1f}s (session_timeout {self.timeout}s)")
        paused_at = self.paused_at
        if paused_at is None:
            deadline = self.last_seen + self.timeout
        elif now - paused_at > self.timeout:
            raise TunnelTimeoutError(
                f"reading from the peer has been paused for {now - paused_at:.1f}s, longer than session_timeout "
                f"({self.timeout}s): a stream's reader or the peer stopped taking data")
        else:  # while we do not read, the peer cannot time out; our pause can
            deadline = max(paused_at + self.timeout, now) + min(0.01, self.timeout)
        send = False
        if self.sends:
            if now >= self.next_heartbeat:
                send = True
                self.sent.append(now)
                if len(self.sent) > MAX_OUTSTANDING:
                    self.sent.popleft()
                self.next_heartbeat = now + self.interval
            deadline = min(deadline, self.next_heartbeat)
        return send, deadline

    def reading_paused(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def reading_resumed(self, now: float) -> None:
        if self.paused_at is not None:
            self.last_seen += now - self.paused_at
            self.paused_at = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def silent_for(self, now: float) -> float:
        """Seconds the peer has been silent, not counting a pause of ours (0 while paused)."""
        return 0.0 if self.paused_at is not None else now - self.last_seen
