"""The HTTP framing kernel: the compiled module (``ferrotunnel.http_kernel``) and its pure-Python
twin (``ferrotunnel.http_kernel_py``) give the same answers, both agree with llhttp on plain
request heads, and the facade (``server.http_framing``) picks the kind the environment asks for.
Every test here runs on each kernel that is built, whatever FERROTUNNEL_* flags are set."""

import importlib
import os
import random

import pytest

import ferrotunnel.frames
import ferrotunnel.http_kernel_py as twin
from ferrotunnel.server import http1, http_framing


def _compiled():
    try:
        return importlib.import_module("ferrotunnel.http_kernel")
    except ImportError:
        if os.environ.get("FERROTUNNEL_REQUIRE_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no"):
            raise
        return None


COMPILED = _compiled()
KERNELS = [twin] + ([COMPILED] if COMPILED is not None else [])
kernels = pytest.mark.parametrize("k", KERNELS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])

# the 30 heads of test_http_proxy.test_plain_heads_parse_as_llhttp_does, and more of the same kind
PLAIN = [b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", b"GET /a?b=c&d=%41;x HTTP/1.0\r\nHost: web\r\n\r\n",
         b"POST /p HTTP/1.1\r\nHost: web:80\r\ncontent-LENGTH:  12 \r\nX-A:\r\n\r\n",
         b"HEAD /h HTTP/1.1\r\nhost: WEB\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-proto: https\r\n"
         b"X-Forwarded-Host: a\r\nAccept: */*\r\nUser-Agent: x y\t z\r\n\r\n",
         b"DELETE /d HTTP/1.1\r\n\r\n", b"OPTIONS /o HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
         b"PUT /u HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n", b"PATCH /~ HTTP/1.1\r\nHost: w\r\n\r\n",
         # new cases
         b"GET /x HTTP/1.1\r\nHost:\t web \t\r\nContent-Length: 000000000000000007\r\n\r\n",
         b"GET /x HTTP/1.1\r\nHost: web\r\nHosts: other\r\nXHost: y\r\nContent-Lengthy: z\r\n\r\n",
         b"GET /x HTTP/1.1\r\nHOST: web\r\nX-Forwarded-For:\r\nX-FORWARDED-HOST: h\r\nX-Forwarded-For: 2\r\n\r\n",
         b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: web\r\nCookie: " + b"c" * 500 + b"\r\n\r\n",
         b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 999999999999999999\r\n\r\n",
         b"GET /x HTTP/1.1\r\nHost: web\r\nKeep-Alive: 5\r\nConnectionx: close\r\n\r\n"]
OTHER = [b"GET * HTTP/1.1\r\nHost: web\r\n\r\n", b"GET http://web/ HTTP/1.1\r\n\r\n",
         b"CONNECT web:80 HTTP/1.1\r\nHost: web\r\n\r\n", b"BREW / HTTP/1.1\r\nHost: web\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
         b"GET / HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nProxy-Connection: close\r\n\r\n",
         b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: x\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1234567890123456789\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost : web\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web\r\n x\r\n\r\n",
         b"GET / HTTP/2.0\r\nHost: web\r\n\r\n", b"GET /a b HTTP/1.1\r\nHost: web\r\n\r\n",
         b"GET /\xff HTTP/1.1\r\nHost: web\r\n\r\n", b"GET / HTTP/1.1\r\nHost: w\xffb\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nX: a\x00b\r\n\r\n", b"GET / HTTP/1.1\nHost: web\r\n\r\n",
         b"\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n", b"GET /#f HTTP/1.1\r\n\r\n",
         # new cases
         b"get / HTTP/1.1\r\nHost: web\r\n\r\n", b"GET / http/1.1\r\nHost: web\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nCONNECTION: close\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nUPGRADE: h2c\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length:\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: +1\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\nX: a\rb\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web\r\n\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: web\r\n", b"GET / HTTP/1.1\r\n: web\r\n\r\n",
         b"GET / HTTP/1.1\r\nHo\x7fst: web\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web\x7f\r\n\r\n",
         b"GET  / HTTP/1.1\r\nHost: web\r\n\r\n", b"GET / HTTP/1.1 \r\nHost: web\r\n\r\n",
         b"GET /a\\b HTTP/1.1\r\nHost: web\r\n\r\n", b"GET / HTTP/1.1\r\nHost: web\r\n\n"]


@kernels
def test_plain_heads_read_as_llhttp_reads_them(k):
    """scan_plain takes exactly the plain heads, wherever they sit in a buffer, and reads them as
    llhttp does (parse_request_llhttp is the reference); every other head is left to llhttp."""
    attrs = ("method", "url", "keep_alive", "hosts", "cl", "xff", "xfp", "xfh")
    for head in PLAIN + OTHER:
        for buf in (b"xx" + head + b"yy", bytearray(b"xx" + head + b"yy"), memoryview(b"xx" + head + b"yy")):
            got = k.scan_plain(buf, 2, len(head) + 2)
            assert (got is not None) == (head in PLAIN), head
            if got is None:
                continue
            ref = http1.parse_request_llhttp(head) if len(got[3]) < 2 else None
            if ref is not None:
                assert list(got) == [getattr(ref, a) for a in attrs], head
                assert not ref.upgrade and not ref.te
            else:  # two Hosts: llhttp reads it, the ingress refuses it
                with pytest.raises(http1.HeadError, match="more than one Host"):
                    http1.parse_request_llhttp(head)


@kernels
def test_scan_plain_reads_only_its_range(k):
    head = PLAIN[0]
    assert k.scan_plain(head + b"GET", 0, len(head)) is not None
    assert k.scan_plain(head, 0, len(head) - 1) is None
    assert k.scan_plain(head, 1, len(head)) is None
    assert k.scan_plain(b"xx" + head, 2, len(head) + 100) is not None  # a stop past the end: to the end
    assert k.scan_plain(head, len(head), 0) is None


def _mutants(rng, heads, count):
    alphabet = b"\r\n \t:/;,aAzZ09-x\x00\x7f\xff"
    for _ in range(count):
        h = bytearray(rng.choice(heads))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(h) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(h):
                del h[i]
            elif op == 1:
                h.insert(i, rng.choice(alphabet))
            elif i < len(h):
                h[i] = rng.choice(alphabet)
        yield bytes(h)


@pytest.mark.skipif(COMPILED is None, reason="the compiled kernel is not built")
def test_compiled_and_twin_read_every_head_alike():
    """Heads mutated byte by byte (deterministic seed): the two kernels give the same answer."""
    rng = random.Random(12)
    for head in list(_mutants(rng, PLAIN + OTHER, 20000)) + PLAIN + OTHER:
        for start, stop in ((0, len(head)), (1, len(head) - 1)):
            assert COMPILED.scan_plain(head, start, stop) == twin.scan_plain(head, start, stop), (head, start)


RESPONSES = (b"HTTP/1.1 100 Continue\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
             b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"                   # to HEAD: no body
             b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"          # no body
             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
             b"HTTP/1.0 200 OK\r\nX: y\r\ncontent-length :\t4 \r\n\r\nwxyz"
             b"HTTP/1.1 204 No Content\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
METHODS = (b"POST", b"HEAD", b"GET", b"GET", b"PUT", b"DELETE", b"GET")


@kernels
def test_responses_are_counted_wherever_they_are_split(k):
    for kind in (bytes, bytearray, memoryview):
        for split in range(1, len(RESPONSES)):
            t = k.ResponseTracker()
            for method in METHODS:
                t.sent(method, False)
            assert t.feed(kind(RESPONSES[:split]), True) == split
            assert not t.idle
            assert t.feed(kind(RESPONSES[split:] + b"EXTRA"), True) == len(RESPONSES) - split, (kind, split)
            assert t.idle and not t.lost


@kernels
def test_response_heads_that_stop_the_tracking(k):
    for head in (b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
                 b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
                 b"Content-Length: 2\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n", b"http/1.1 200 OK\r\n\r\n"):
        t = k.ResponseTracker()
        t.sent(b"GET", False)
        assert t.feed(head + b"x", True) == len(head) + 1
        assert t.lost, head
    t = k.ResponseTracker()
    t.sent(b"GET", False)
    assert t.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * k.MAX_RESPONSE_HEAD) > 0 and t.lost  # too long a head
    for te, state in ((b"chunked, gzip", k.ResponseTracker.UNTIL_EOF), (b"x, CHUNKED ", k.ResponseTracker.CHUNKED)):
        t = k.ResponseTracker()
        t.sent(b"GET", False)
        t.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
        assert t.state == state and not t.lost


@kernels
def test_upgrade_answers_and_repeats(k):
    t = k.ResponseTracker()
    t.sent(b"GET", True)
    switch = b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw"
    assert t.feed(switch, True) == len(switch)
    assert t.raw and t.answered_upgrade is True and t.idle is False
    t = k.ResponseTracker()
    t.sent(b"CONNECT", True)
    t.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    assert t.raw and t.answered_upgrade is True
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    t = k.ResponseTracker()
    for method, upgrade in ((b"GET", False), (b"GET", False), (b"HEAD", False), (b"POST", False), (b"GET", True)):
        t.sent(method, upgrade)
        body = b"" if method == b"HEAD" else b"abc"
        assert t.feed(resp + body + b"HTTP/1.1 200 OK", True) == len(resp + body), method
        assert t.idle and t.answered_upgrade is (False if upgrade else None)
        t.answered_upgrade = None
    assert t.known == resp and t.known_left == 3
    t.sent(b"GET", False)
    assert t.feed(resp + b"abc") == len(resp) + 3 and t.idle  # one whole repeat, at once
    t.sent(b"GET", False)
    t.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
    assert t.state == t.LENGTH and t.left == 30


@pytest.mark.skipif(COMPILED is None, reason="the compiled kernel is not built")
def test_compiled_and_twin_follow_response_streams_alike():
    """Random streams of random responses, cut at random places: the same bytes consumed, the
    same state after every piece."""
    rng = random.Random(7)
    parts = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"HTTP/1.1 204 No Content\r\n\r\n",
             b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"2;x\r\nab\r\n0\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nA: b"
             b"\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
             b"HTTP/1.1 200 OK\r\ncontent-length:0\r\n\r\n", b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n"]
    for _ in range(400):
        picks = [rng.choice(parts) for _ in range(rng.randint(1, 6))]
        stream = bytearray(b"".join(picks))
        if rng.random() < 0.3:  # a damaged byte somewhere
            stream[rng.randrange(len(stream))] = rng.choice(b"\r\n :0x")
        methods = [rng.choice((b"GET", b"HEAD", b"POST")) for _ in picks]
        cuts = sorted(rng.sample(range(1, len(stream)), min(3, len(stream) - 1)))
        trackers = [m.ResponseTracker() for m in (twin, COMPILED)]
        for t in trackers:
            for method in methods:
                t.sent(method, False)
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            piece = bytes(stream[a:b])
            got = [t.feed(piece, True) for t in trackers]
            state = [(t.state, t.left, t.lost, t.raw, bytes(t.head), len(t.pending), t.idle, t.known)
                     for t in trackers]
            assert got[0] == got[1] and state[0] == state[1], (bytes(stream), methods, cuts)


@kernels
def test_chunked_bodies_end_where_they_end(k):
    body = b"5\r\nhello\r\n1A;ext=\"x\"\r\n" + b"z" * 26 + b"\r\n 0 ;e\r\nX-T: 1\r\nX-U: 2\r\n\r\n"
    for kind in (bytes, bytearray, memoryview):
        for split in range(1, len(body)):
            c = k.Chunked()
            first = c.feed(kind(body[:split]), 0)
            if first >= 0:
                assert split == len(body) and first == len(body), split
                continue
            assert c.feed(kind(body[split:] + b"NEXT"), 0) + split == len(body), (kind, split)
    assert k.Chunked().feed(b"xx0\r\n\r\nGET", 2) == 7
    assert k.Chunked().feed(b"F" * 16 + b"\r\n", 0) == -1  # the largest size there is
    for bad, why in ((b"g\r\n", "chunk size"), (b"5\r\nhelloXX", "longer than its size"), (b"5\nhello", "bare LF"),
                     (b"1" * 17 + b"\r\n", "chunk size"), (b"5;" + b"e" * 5000, "too long"), (b"\r\n", "chunk size"),
                     (b";x\r\n", "chunk size"), (b"0\r\n" + b"T: x\r\n" * 3000, "trailers too long"),
                     (b'5;a="\rx"\r\nhello\r\n', "control character"), (b"5;a\x00\r\n", "control character"),
                     (b"5;a=\x7f\r\n", "control character")):
        with pytest.raises(twin.HeadError, match=why):
            k.Chunked().feed(bad, 0)


def test_limits_and_errors_are_shared():
    for k in KERNELS:
        assert k.HeadError is twin.HeadError is http1.HeadError
        assert (k.MAX_CHUNK_LINE, k.MAX_TRAILERS, k.MAX_RESPONSE_HEAD) == (4096, 16 * 1024, 64 * 1024)
    assert http_framing.MAX_RESPONSE_HEAD == http1.MAX_RESPONSE_HEAD == 64 * 1024


def test_the_facade_uses_the_kernel_of_the_codecs_kind():
    kind = http_framing.IMPLEMENTATION
    assert kind == ferrotunnel.frames.IMPLEMENTATION
    mod = COMPILED if kind == "c" else twin
    assert mod is not None
    assert http_framing.ResponseTracker is mod.ResponseTracker is http1.ResponseTracker
    assert http_framing.Chunked is mod.Chunked and http_framing.scan_plain is mod.scan_plain
    if os.environ.get("FERROTUNNEL_NO_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no"):
        assert kind == "py"
    elif os.environ.get("FERROTUNNEL_REQUIRE_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no"):
        assert kind == "c"


# A child interpreter in which only the HTTP kernel cannot be imported (a build from before it).
_NO_KERNEL = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ferrotunnel.http_kernel":
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:  # (the package's __init__ imports the server's modules)
        import ferrotunnel.frames as f
        import ferrotunnel.server.http_framing as h
    except ImportError as exc:
        print("-", "ImportError", "FERROTUNNEL_REQUIRE_EXTENSIONS" in str(exc))
    else:
        print(f.IMPLEMENTATION, h.IMPLEMENTATION, sum("http_kernel" in str(w.message) for w in caught))
"""


@pytest.mark.skipif(COMPILED is None, reason="the compiled codec and kernel are not built")
def test_a_missing_kernel_falls_back_with_a_warning_or_is_an_error_when_required():
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_")}

    def child(**env):
        return subprocess.run([sys.executable, "-c", _NO_KERNEL], env=dict(clean, **env), capture_output=True,
                              text=True, check=True).stdout.split()
    assert child() == ["c", "py", "1"]
    assert child(FERROTUNNEL_REQUIRE_EXTENSIONS="1") == ["-", "ImportError", "True"]
    assert child(FERROTUNNEL_NO_EXTENSIONS="1") == ["py", "py", "0"]


@kernels
def test_chunked_trailers_with_a_bare_lf_cr_or_fold_are_refused_wherever_split(k):
    """A peer that ends the trailers at a bare LF would read what follows as a new request (one
    that skipped the ingress's checks): such trailers are refused, however the bytes arrive."""
    smuggle = b"0\r\nX: a\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    for bad in (smuggle, b"0\r\nX: a\rb\r\n\r\n", b"0\r\nX: a\r\n b\r\n\r\n", b"0\r\nX: a\r\n\tb\r\n\r\n"):
        for split in range(1, len(bad)):
            c = k.Chunked()
            with pytest.raises(twin.HeadError, match="malformed chunked trailers"):
                if c.feed(bad[:split], 0) < 0:
                    c.feed(bad[split:], 0)
    assert k.Chunked().feed(b"0\r\nX-T: 1\r\nX-U: 2\r\n\r\nNEXT", 0) == len(b"0\r\nX-T: 1\r\nX-U: 2\r\n\r\n")


@kernels
def test_rewrite_repeat_writes_the_lines_only_over_an_exact_repeat_with_room(k):
    last = b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n"
    lines = b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: web\r\n\r\n"
    start = 9

    def buffer(read: bytes, room: int) -> bytearray:
        return bytearray(b"h" * start + read + b"\xee" * room)

    buf = buffer(last, len(lines) - 2)  # room for exactly what is written past the read
    assert k.rewrite_repeat(buf, start, len(last), last, lines) == len(last) - 2 + len(lines)
    assert buf == b"h" * start + last[:-2] + lines
    kept = [buffer(last, len(lines) - 3)]  # one byte short
    kept += [buffer(last[:i] + bytes([last[i] ^ 0x20]) + last[i + 1:], 200) for i in range(len(last))]
    for buf in kept:
        before = bytes(buf)
        assert k.rewrite_repeat(buf, start, len(last), last, lines) == -1
        assert buf == before
    buf = buffer(last + b"GET", 200)  # more than the head: a pipelined request after it
    assert k.rewrite_repeat(buf, start, len(last) + 3, last, lines) == -1
    assert k.rewrite_repeat(buf, start, len(last) - 1, last, lines) == -1
    assert k.rewrite_repeat(bytearray(300), start, 0, b"", lines) == -1  # no last head yet
    assert k.rewrite_repeat(bytearray(b"\n" * 300), start, 1, b"\n", lines) == -1
    assert k.rewrite_repeat(buffer(last, 200), -1, len(last), last, lines) == -1


def test_long_runs_of_spaces_in_field_values_are_read_in_linear_time():
    """A field value with a long run of spaces before its last character: the field regexes once
    backtracked quadratically on it (about 3 s of a frozen event loop for one 16 KiB head at the
    ingress, about 50 s for these 64 KiB values). Each read must finish within a generous bound
    that only a hang passes, and still strip the whitespace around the value."""
    import time

    from ferrotunnel.server import guard

    pad = b" " * 65536
    head = (b"GET / HTTP/1.1\r\nHost: web" + pad + b"\r\nConnection: x\r\nX-Forwarded-For:" + pad + b"1.2.3.4\r\n"
            b"Authorization:" + pad + b"Basic abc" + pad + b"\r\n\r\n")
    half = b" " * (http1.MAX_RESPONSE_HEAD // 2 - 100)  # (a response head is at most that long)
    response = b"HTTP/1.1 200 OK\r\nContent-Length:" + half + b"5" + half + b"\r\n\r\nhello"
    t0 = time.monotonic()
    req = http1.parse_request(head)
    assert req.hosts == (b"web",) and req.xff == (b"1.2.3.4",)
    assert guard.authorization_values(head) == (b"Basic abc",)
    assert b"Authorization" not in guard.strip_authorization(head)
    assert twin.scan_plain(b"GET / HTTP/1.1\r\nHost: web" + pad + b"x\r\n\r\n", 0, 10**6)[3] == (b"web" + pad + b"x",)
    tracker = twin.ResponseTracker()
    tracker.sent(b"GET", False)
    assert tracker.feed(response) == len(response) and tracker.idle and not tracker.lost
    assert time.monotonic() - t0 < 5.0
