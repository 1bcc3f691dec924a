"""Per-request CPU cost of the HTTP ingress's repeated-request path, in one process, without
sockets: ``HttpBridge`` (a keep-alive connection already routed, on the quick path) against the
plain ``TcpBridge`` pipe (what the base commit did after the first head), each driven through the
same calls the event loop and the tunnel make for one small request and its response:
``get_buffer`` + ``buffer_updated`` (the request), ``tunnel_data`` + ``flush_out`` (the response).
The stream and the transport are stubs that take the bytes and do nothing else, so the difference
of the two rows is what the HTTP handling costs per request (less noisy than ``http_ab``).

    python bench/http_bridge_micro.py [--number 20000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import timeit

from ferrotunnel.aio.bridge import TcpBridge
from ferrotunnel.server import http_framing
from ferrotunnel.server.http1 import forwarded_lines
from ferrotunnel.server.http_bridge import HttpBridge

REQUEST = b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Stream:
    stream_id = 1

    def try_send_frame(self, buf: bytearray, n: int) -> bool:
        return True

    def send_room(self) -> int:
        return 1 << 30

    def consumed(self, n: int) -> None:
        pass

    def defer_flush(self, sink: object) -> None:
        pass


class Transport:
    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list) -> None:
        pass


def setup(bridge: TcpBridge) -> TcpBridge:
    bridge.stream = Stream()  # type: ignore[assignment]
    bridge.transport = Transport()
    if isinstance(bridge, HttpBridge):  # as after a first request routed to tunnel "web"
        state = {"_seen": (b"web", "web", forwarded_lines(b"127.0.0.1", b"http", b"web")),
                 "tracker": http_framing.ResponseTracker(), "_tunnel": "web", "_client": "127.0.0.1"}
        for name, value in state.items():
            setattr(bridge, name, value)
    return bridge


def one(bridge: TcpBridge, request: bytes = REQUEST, response: bytes = RESPONSE) -> None:
    view = bridge.get_buffer(-1)
    view[:len(request)] = request
    bridge.buffer_updated(len(request))
    bridge.tunnel_data(memoryview(response))
    bridge.flush_out()


def measure(bridges: "dict[str, TcpBridge]", number: int, rounds: int = 30) -> "dict[str, float]":
    """Microseconds per request of each bridge: the best of ``rounds`` runs of ``number``
    requests, the bridges taking turns (so a burst of load elsewhere hits them alike)."""
    best = {name: float("inf") for name in bridges}
    for bridge in bridges.values():
        one(bridge)
    for _ in range(rounds):
        for name, bridge in bridges.items():
            best[name] = min(best[name], timeit.timeit(lambda: one(bridge), number=number) / number * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    bridges = {"TcpBridge (base pipe)": setup(TcpBridge()),
               "HttpBridge quick path": setup(HttpBridge(None))}  # type: ignore[arg-type]
    rows = measure(bridges, args.number, args.rounds)
    print(f"kernel: {http_framing.IMPLEMENTATION}")
    for name, us in rows.items():
        print(f"{name:<26}{us:8.2f} us per request")
    base = rows["TcpBridge (base pipe)"]
    print(f"{'HTTP handling':<26}{rows['HttpBridge quick path'] - base:8.2f} us per request")


if __name__ == "__main__":
    main()
