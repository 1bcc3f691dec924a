"""Per-call cost of the HTTP framing kernels, compiled (``ferrotunnel.http_kernel``) and twin
(``ferrotunnel.http_kernel_py``), side by side in one process: a plain request head read
(``scan_plain``; the last column: ``http1.parse_plain``, a Request on top of the active kernel), a response head followed by
``ResponseTracker`` (a new one each time, a repeat, a varying one), a chunked body.

    python bench/http_kernel_micro.py [--number 100000]
"""

from __future__ import annotations

import argparse
import itertools
import timeit

import ferrotunnel.http_kernel_py as twin
from ferrotunnel.server import http1

try:
    import ferrotunnel.http_kernel as compiled
    KERNELS = [("c", compiled), ("py", twin)]
except ImportError:
    KERNELS = [("py", twin)]

SHORT = b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n"
BROWSER = (b"GET /api/items?page=2&sort=name HTTP/1.1\r\nHost: web.example.test\r\nUser-Agent: Mozilla/5.0 (X11; "
           b"Linux x86_64) Gecko/20100101 Firefox/120.0\r\nAccept: text/html,application/xhtml+xml\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\nCookie: session=abcdef0123456789; "
           b"theme=dark\r\n\r\n")
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
API = [b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 01:00:%02d GMT\r\nContent-Type: application/json\r\n"
       b"Content-Length: 17\r\nServer: x\r\n\r\n{\"items\":[1,2,3]}" % i for i in range(60)]
CHUNKED = b"5\r\nhello\r\n1A;ext=1\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n"


def us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=100000)
    n = ap.parse_args().number
    rows = {}
    for tag, k in KERNELS:
        r = rows[tag] = {}
        for name, head in (("scan_plain short", SHORT), ("scan_plain browser", BROWSER)):
            r[name] = us(lambda: k.scan_plain(head, 0, len(head)), n)

        def new_small() -> None:
            t = k.ResponseTracker()
            t.sent(b"GET", False)
            t.feed(SMALL, True)
        r["tracker new + feed"] = us(new_small, n)
        t = k.ResponseTracker()
        r["tracker repeat feed"] = us(lambda: (t.sent(b"GET", False), t.feed(SMALL, True)), n)
        t2 = k.ResponseTracker()
        it = itertools.cycle(API)
        r["tracker varying head"] = us(lambda: (t2.sent(b"GET", False), t2.feed(next(it), True)), n)
        r["chunked body"] = us(lambda: k.Chunked().feed(CHUNKED, 0), n)
    rows["active parse_plain"] = {"scan_plain short": us(lambda: http1.parse_plain(SHORT, 0, len(SHORT)), n),
                                  "scan_plain browser": us(lambda: http1.parse_plain(BROWSER, 0, len(BROWSER)), n)}
    names = list(rows[KERNELS[0][0]])
    print(f"{'µs per call':<24}" + "".join(f"{tag:>10}" for tag, _ in KERNELS) + f"{'parse_plain':>14}")
    for name in names:
        extra = rows["active parse_plain"].get(name)
        print(f"{name:<24}" + "".join(f"{rows[tag][name]:>10.2f}" for tag, _ in KERNELS)
              + (f"{extra:>14.2f}" if extra is not None else ""))


if __name__ == "__main__":
    main()
