"""Issue 10's attacks against the real CLI processes, "before" and "after", in one run.

    python bench/attacks.py --before /tmp/venv-before/bin/python --after /tmp/venv-after/bin/python \
        [--only 1,2] [--out /tmp/attacks.md]

``--before`` and ``--after`` are the interpreters of two installs of ferrotunnel (non-editable, each
one commit, compiled extensions). Every attack starts a fresh ``python -m ferrotunnel server`` (and,
where it needs one, ``python -m ferrotunnel client`` and a small local app run from this file) on
free loopback ports, attacks it, reads RSS from /proc/PID/status (VmRSS) and descriptors from
/proc/PID/fd, and kills every process it started. Attack frames are built by hand from
PROTOCOL.md, so this script imports neither install. Attackers connect from 127.0.0.2, honest
clients from 127.0.0.1 (per-address limits are meant to tell them apart). Prints a markdown table
``| # | attack | before | after |`` and writes it to ``--out`` when given. Needs Linux; about
10 minutes for all 14 attacks.

``python bench/attacks.py --app PORT`` runs the local app alone: ``DL n\\n`` gets n bytes then a
close, an HTTP request gets ``200 ok``, anything else is echoed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

TOKEN = "bench-attack-token-0123456789"
ATTACKER = "127.0.0.2"
HONEST = "127.0.0.1"
MiB = 1024 * 1024
# what the real client announces (flow control and the extension on)
CAPS = ["basic", "tcp", "ferrotunnel-py/1", "flow-control/1;window=262144", "reject-reason/1"]


# ------------------------------------------------------------------ frames, by hand (PROTOCOL.md)

def varint(v: int) -> bytes:
    if v <= 250:
        return bytes([v])
    if v <= 0xFFFF:
        return b"\xfb" + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return b"\xfc" + struct.pack("<I", v)
    return b"\xfd" + struct.pack("<Q", v)


def read_varint(b: bytes, i: int) -> Tuple[int, int]:
    m = b[i]
    if m <= 250:
        return m, i + 1
    size = {0xFB: 2, 0xFC: 4, 0xFD: 8}[m]
    return int.from_bytes(b[i + 1:i + 1 + size], "little"), i + 1 + size


def string(x) -> bytes:
    x = x.encode() if isinstance(x, str) else bytes(x)
    return varint(len(x)) + x


def control(body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, 0) + body


def handshake(token: str = TOKEN, tunnel_id: Optional[str] = None, caps=CAPS) -> bytes:
    tid = b"\x00" if tunnel_id is None else b"\x01" + string(tunnel_id)
    return control(b"\x00" + string(token) + tid + b"\x01\x01" + varint(len(caps)) + b"".join(map(string, caps)))


def open_stream(sid: int, protocol: int = 4) -> bytes:
    return control(b"\x04" + varint(sid) + bytes([protocol]) + b"\x00\x00\x00")


def error(sid: int, code: int = 0, msg: str = "") -> bytes:
    return control(b"\x0a\x01" + varint(sid) + bytes([code]) + string(msg))


def heartbeat(ts: int) -> bytes:
    return control(b"\x08" + varint(ts))


def data(sid: int, payload: bytes) -> bytes:
    return struct.pack(">IBIB", len(payload) + 6, 1, sid, 0) + payload


def plugin(pid: str, payload: bytes) -> bytes:
    return control(b"\x0b" + string(pid) + string(payload))


def huge_openstream(total: int = 16 * MiB, send: Optional[int] = None) -> bytes:
    """An OpenStream whose length prefix is ``total`` (16 MiB, the protocol's maximum): ~8M empty
    headers and one ("a", ""), so the body fills the frame exactly. ``send``: only that many bytes."""
    n = (total - 1 - 11) // 2  # body = 11 + 2n bytes, see PROTOCOL.md 2.4
    body = b"\x04\x01\x04" + b"\xfc" + struct.pack("<I", n) + b"\x00\x00" * (n - 1) + b"\x01a\x00" + b"\x00\x00"
    frame = struct.pack(">IB", len(body) + 1, 0) + body
    assert len(frame) == total + 4
    return frame if send is None else frame[:send]


class FrameReader:
    """Frames off a blocking socket: (type, body). Keeps up with a server that answers every frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.pos = sock, bytearray(), 0

    def _need(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            self.buf += chunk
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def frame(self) -> Tuple[int, bytes]:
        (length,) = struct.unpack(">I", self._need(4))
        body = self._need(length)
        return body[0], body[1:]


def describe_error(body: bytes) -> Tuple[Optional[int], str]:
    """(stream id or None, message) of an Error control body (variant byte included)."""
    i = 1
    sid = None
    if body[i] == 1:
        sid, i = read_varint(body, i + 1)
    else:
        i += 1
    i += 1  # code
    n, i = read_varint(body, i)
    return sid, body[i:i + n].decode(errors="replace")


# ------------------------------------------------------------------ sockets and processes

def connect(port: int, src: str = HONEST, timeout: float = 5.0, rcvbuf: Optional[int] = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def honest_handshake(port: int, timeout: float = 5.0, tunnel_id: Optional[str] = None) -> Tuple[bool, float, str]:
    """A client handshake from 127.0.0.1: (accepted, seconds, what happened)."""
    t0 = time.monotonic()
    try:
        with connect(port, HONEST, timeout) as s:
            s.settimeout(max(0.01, timeout - (time.monotonic() - t0)))
            s.sendall(handshake(tunnel_id=tunnel_id))
            kind, body = FrameReader(s).frame()
            ok = kind == 0 and body[0] == 1 and body[18] == 0
            return ok, time.monotonic() - t0, "ok" if ok else f"status {body[18]}"
    except (OSError, EOFError) as exc:
        return False, time.monotonic() - t0, type(exc).__name__


def download(port: int, n: int, timeout: float = 30.0) -> Tuple[int, float, str]:
    """Ask the app through the TCP ingress for n bytes: (bytes got, seconds, how it ended)."""
    t0 = time.monotonic()
    got, end = 0, "eof"
    try:
        with connect(port, HONEST, timeout) as s:
            s.sendall(b"DL %d\n" % n)
            while got < n:
                s.settimeout(max(0.01, timeout - (time.monotonic() - t0)))
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
    except OSError as exc:
        end = type(exc).__name__
    return got, time.monotonic() - t0, end


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Proc:
    def __init__(self, argv: List[str], log: str, env: Dict[str, str], preexec=None) -> None:
        self.log = log
        self.f = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self.f, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(log),
                                  start_new_session=True, preexec_fn=preexec)
        self.pid = self.p.pid

    def text(self) -> bytes:
        with open(self.log, "rb") as f:
            return f.read()

    def wait_for(self, needle: bytes, timeout: float = 10.0, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def rss(self) -> float:
        return rss_mb(self.pid)

    def fds(self) -> int:
        return fds(self.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.pid, sig)  # its own session (start_new_session): only this process
            except ProcessLookupError:
                pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.p.wait()
        self.f.close()


class Peak:
    """The highest RSS of a process, sampled every 10 ms while the block runs."""

    def __init__(self, proc: Proc) -> None:
        self.proc, self.max, self._stop = proc, proc.rss(), threading.Event()

    def __enter__(self) -> "Peak":
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.max = max(self.max, self.proc.rss())
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


class Rig:
    """Processes of one attack against one install; ``close`` kills them all."""

    def __init__(self, python: str, tag: str, tmp: str) -> None:
        self.python, self.tag = python, tag
        self.dir = tempfile.mkdtemp(prefix=f"{tag}-", dir=tmp)
        self.procs: List[Proc] = []
        self.port = self.tcp_port = self.http_port = self.app_port = 0
        self.server_proc: Optional[Proc] = None

    def env(self, token: bool = True) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL")}
        if token:
            env["FERROTUNNEL_TOKEN"] = TOKEN
        return env

    def spawn(self, name: str, argv: List[str], env=None, preexec=None) -> Proc:
        p = Proc(argv, os.path.join(self.dir, f"{name}-{len(self.procs)}.log"), env or self.env(), preexec)
        self.procs.append(p)
        return p

    def server(self, extra: List[str] = (), env=None, preexec=None, ready: bytes = b"listening on") -> Proc:
        self.port, self.tcp_port, self.http_port = free_port(), free_port(), free_port()
        argv = [self.python, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{self.port}",
                "--tcp-bind", f"127.0.0.1:{self.tcp_port}=app", "--http-bind", f"127.0.0.1:{self.http_port}",
                *extra]
        p = self.server_proc = self.spawn("server", argv, env, preexec)
        if not p.wait_for(ready):
            raise RuntimeError(f"server did not start: {p.text()[-300:]!r}")
        time.sleep(0.2)
        return p

    def app(self) -> int:
        self.app_port = free_port()
        p = self.spawn("app", [sys.executable, os.path.abspath(__file__), "--app", str(self.app_port)], self.env(False))
        if not p.wait_for(b"ready"):
            raise RuntimeError("local app did not start")
        return self.app_port

    def client(self, extra: List[str] = (), env=None, wait: bool = True) -> Proc:
        if not self.app_port:
            self.app()
        argv = [self.python, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{self.port}",
                "--local-addr", f"127.0.0.1:{self.app_port}", "--tunnel-id", "app", *extra]
        p = self.spawn("client", argv, env)
        if wait and not p.wait_for(b"connected to"):
            raise RuntimeError(f"client did not connect: {p.text()[-300:]!r}")
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()


def mb(x: float) -> str:
    return f"{x:.0f} MB" if abs(x) >= 10 else f"{x:.1f} MB"


def dmb(x: float) -> str:
    return ("+" if x >= 0 else "−") + mb(abs(x))


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def run_threads(fns: List[Callable[[], object]]) -> List[object]:
    out: List[object] = [None] * len(fns)

    def run(i: int) -> None:
        out[i] = fns[i]()

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def new_lines(proc: Proc, since: int) -> List[bytes]:
    return proc.text()[since:].splitlines()


def printable(b: bytes, n: int = 160) -> str:
    s = b.decode(errors="replace")
    s = re.sub(r"^\S+ \S+ ", "", s)  # drop the timestamp
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s[:n] + ("…" if len(s) > n else "")


# ------------------------------------------------------------------ the attacks

def a1_big_first_frame(rig: Rig) -> str:
    srv = rig.server()
    alone_ok, alone, _ = honest_handshake(rig.port)
    base = srv.rss()
    frame = huge_openstream()
    sent = threading.Event()
    result: Dict[str, object] = {}

    def attacker() -> None:
        t0 = time.monotonic()
        try:
            s = connect(rig.port, ATTACKER, 30)
            s.sendall(frame)
            result["sent"] = "all"
        except OSError as exc:
            result["sent"] = type(exc).__name__
            s = None
        sent.set()
        if s is not None:
            try:
                s.settimeout(10)
                s.recv(1 << 16)  # '' or a reset when the server drops us
                result["cut"] = time.monotonic() - t0
            except OSError as exc:
                result["cut"] = time.monotonic() - t0 if not isinstance(exc, socket.timeout) else None
            s.close()

    with Peak(srv) as peak:
        t = threading.Thread(target=attacker, daemon=True)
        t.start()
        sent.wait(30)
        ok, took, what = honest_handshake(rig.port, timeout=15)
        t.join(15)
        time.sleep(1.0)
    after = srv.rss()
    cut = result.get("cut")
    return (f"RSS {mb(base)} → peak {mb(peak.max)} ({dmb(peak.max - base)}), {mb(after)} 1 s later; "
            f"honest handshake {'ok' if ok else 'FAILED (' + what + ')'} in {ms(took)} (alone {ms(alone)}); "
            f"attacker {'sent all 16 MiB' if result.get('sent') == 'all' else 'cut while sending'}"
            f"{', dropped after ' + ms(cut) if cut else ''}")


def a2_forty_partial_frames(rig: Rig) -> str:
    srv = rig.server()
    base = srv.rss()
    chunk = huge_openstream(send=15 * MiB)  # 15 of 16 MiB: never a complete frame
    socks: List[Optional[socket.socket]] = []

    def attacker() -> str:
        try:
            s = connect(rig.port, ATTACKER, 10)
            socks.append(s)
            s.sendall(chunk)
            return "all"
        except OSError as exc:
            return type(exc).__name__

    with Peak(srv) as peak:
        outcomes = run_threads([attacker] * 40)
        time.sleep(1.0)
        held = srv.rss()
        ok, took, what = honest_handshake(rig.port, timeout=10)
    open_ = 0
    for s in socks:  # still open? a closed one reads '' or raises at once
        try:
            s.setblocking(False)
            open_ += bool(s.recv(1))  # b"": closed by the server
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    for s in socks:
        s.close()
    return (f"RSS {mb(base)} → {mb(held)} (peak {mb(peak.max)}) with 40 × 15 MiB sent; "
            f"{outcomes.count('all')}/40 sent all of it, {open_}/40 still open; "
            f"honest handshake {'ok' if ok else 'FAILED (' + what + ')'} in {ms(took)}")


def a3_silent_sockets(rig: Rig) -> str:
    srv = rig.server()
    log0 = len(srv.text())
    duration, holders, honest_n = 10.0, 600, 40

    async def main() -> Tuple[int, List[Tuple[bool, float]], int]:
        loop = asyncio.get_running_loop()
        stop = loop.time() + duration
        opened = 0
        peak_fds = 0

        async def hold() -> None:
            nonlocal opened
            while loop.time() < stop:
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(
                        "127.0.0.1", rig.port, local_addr=(ATTACKER, 0)), max(0.01, stop - loop.time()))
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
                opened += 1
                try:  # silent until the server closes it, then refill
                    await asyncio.wait_for(r.read(1), max(0.01, stop - loop.time()))
                except (OSError, asyncio.TimeoutError):
                    pass
                w.close()

        async def honest(i: int) -> Tuple[bool, float]:
            await asyncio.sleep(1.0 + i * (duration - 3.0) / honest_n)
            ok, took, _ = await asyncio.to_thread(honest_handshake, rig.port, 5.0)
            return ok, took

        async def watch_fds() -> None:
            nonlocal peak_fds
            while loop.time() < stop:
                peak_fds = max(peak_fds, srv.fds())
                await asyncio.sleep(0.2)

        tasks = [asyncio.ensure_future(hold()) for _ in range(holders)]
        fdw = asyncio.ensure_future(watch_fds())
        results = await asyncio.gather(*(honest(i) for i in range(honest_n)))
        await asyncio.gather(*tasks, fdw)
        return opened, results, peak_fds

    opened, results, peak_fds = asyncio.run(main())
    time.sleep(0.3)
    warnings = sum(b"WARNING" in line for line in new_lines(srv, log0))
    got = [t for ok, t in results if ok]
    med = sorted(got)[len(got) // 2] if got else 0.0
    return (f"{len(got)}/{honest_n} honest clients got in"
            f"{' (median ' + ms(med) + ')' if got else ''}; {warnings} WARNING lines in {duration:.0f} s; "
            f"{opened} attacker sockets opened; server fds peak {peak_fds}")


def authed(port: int, tunnel_id: str, rcvbuf: Optional[int] = None, src: str = ATTACKER) -> Tuple[socket.socket, FrameReader]:
    s = connect(port, src, 5, rcvbuf)
    s.sendall(handshake(tunnel_id=tunnel_id))
    r = FrameReader(s)
    kind, body = r.frame()
    if not (kind == 0 and body[0] == 1 and body[18] == 0):
        raise RuntimeError(f"handshake refused: {body[:40]!r}")
    return s, r


def a4_rapid_reset(rig: Rig) -> str:
    srv = rig.server()
    base = srv.rss()
    s, r = authed(rig.port, "flood")
    s.settimeout(None)  # the reader below waits as long as the session lives
    info: Dict[str, object] = {"closed": False, "error": "", "we_closed": False}
    synced = threading.Event()
    marker = 4242424242

    def drain() -> None:  # read (and drop) everything, note the session's end
        try:
            while True:
                kind, body = r.frame()
                if kind == 0 and body[0] == 10:
                    sid, msg = describe_error(body)
                    if sid is None:
                        info["error"] = msg
                elif kind == 0 and body[0] == 9:  # the ack of our only heartbeat, sent last:
                    synced.set()  # the server has worked through everything we sent
        except (OSError, EOFError):
            info["closed"] = not info["we_closed"]
            synced.set()

    threading.Thread(target=drain, daemon=True).start()
    cycles, sid, batch = 0, 1, 500
    t0 = time.monotonic()
    with Peak(srv) as peak:
        try:
            while cycles < 200_000 and time.monotonic() - t0 < 20 and not info["closed"]:
                buf = bytearray()
                for _ in range(batch):
                    buf += open_stream(sid)
                    buf += error(sid, 0, "reset")
                    sid += 2
                s.sendall(buf)
                cycles += batch
            s.sendall(heartbeat(marker))
        except OSError:
            pass
        sent = time.monotonic() - t0
        ok, hs, _ = honest_handshake(rig.port, timeout=30)  # while the server works through the flood
        synced.wait(30)
        took = time.monotonic() - t0
        during = srv.rss()
    info["we_closed"] = True
    s.close()
    time.sleep(1.5)
    after = srv.rss()
    err = (": " + repr(printable(str(info["error"]).encode(), 90))) if info["error"] else ""
    return (f"{cycles:,} cycles sent in {sent:.1f} s, processed in {took:.1f} s"
            f"{'; the server ended the session' + err if info['closed'] else '; session not ended by the server'}; "
            f"RSS {mb(base)} → {mb(during)} (peak {mb(peak.max)}) once processed → {mb(after)} 1.5 s after disconnect; "
            f"honest handshake during the flood {'ok' if ok else 'FAILED'} in {ms(hs)}")


def flood_no_read(rig: Rig, make: Callable[[int], bytes], seconds: float = 8.0) -> str:
    srv = rig.server()
    s, _ = authed(rig.port, "noread", rcvbuf=4096)  # and never read again
    s.settimeout(3.0)
    time.sleep(0.2)
    base = srv.rss()
    frames, batch, stopped = 0, 2000, False
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and frames < 3_000_000:
        buf = b"".join(make(frames + i) for i in range(batch))
        try:
            s.sendall(buf)
        except socket.timeout:
            stopped = True  # the server stopped reading us
            break
        except OSError as exc:
            stopped = type(exc).__name__
            break
        frames += batch
    took = time.monotonic() - t0
    time.sleep(1.0)
    grown = srv.rss() - base
    s.close()
    time.sleep(1.0)
    left = srv.rss() - base
    per = grown * MiB / frames if frames else 0
    how = (f"server stopped reading after {took:.1f} s" if stopped is True else f"server dropped us ({stopped})"
           if stopped else f"server kept reading for {seconds:.0f} s")
    return f"{frames:,} frames, {how}; RSS {dmb(grown)} ({per:.0f} B/frame), {dmb(left)} after disconnect"


def a5_noread_flood(rig: Rig) -> str:
    hb = flood_no_read(rig, lambda i: heartbeat(1_770_000_000_000 + i))
    rig.close()
    rig.procs.clear()
    unknown = flood_no_read(rig, lambda i: data(1_000_001 + 2 * i, b"x"))
    return f"heartbeats: {hb}. data for unknown streams: {unknown}"


def a6_three_sessions(rig: Rig) -> str:
    srv = rig.server()
    rig.app()
    seen = [srv.rss()]
    fd_seen = [srv.fds()]
    moved_s = []
    for i in range(3):
        cli = rig.client()
        t0 = time.monotonic()
        got = run_threads([lambda: download(rig.tcp_port, 10 * MiB, 15)] * 10)
        moved = sum(g[0] for g in got)
        took = time.monotonic() - t0
        moved_s.append(f"{moved / MiB / took:.0f} MB/s" if moved == 100 * MiB
                       else f"STALLED: {moved / MiB:.0f} of 100 MiB in {took:.0f} s")
        cli.kill(signal.SIGTERM)
        srv.wait_for(b"closed", 10, count=i + 1)
        time.sleep(1.0)
        seen.append(srv.rss())
        fd_seen.append(srv.fds())
    return (f"server RSS idle {' → '.join(f'{x:.0f}' for x in seen)} MB, fds {' → '.join(map(str, fd_seen))}; "
            f"each session 10 visitors × 10 MiB: {', '.join(moved_s)}")


def a7_stalled_visitors(rig: Rig) -> str:
    srv = rig.server()
    rig.client()
    size = 32 * MiB
    got, took, _ = download(rig.tcp_port, size, 20)
    alone = got / MiB / took
    stallers: List[socket.socket] = []

    def stall() -> bool:  # ask for 64 MiB, read 256 KiB, then never read again
        try:
            s = connect(rig.tcp_port, ATTACKER, 3, rcvbuf=4096)
            stallers.append(s)
            s.sendall(b"DL %d\n" % (64 * MiB))
            n = 0
            while n < 256 * 1024:
                c = s.recv(65536)
                if not c:
                    return False
                n += len(c)
            return True
        except OSError:
            return False

    n = 40
    fed = run_threads([stall] * n)
    time.sleep(2.0)
    base = srv.rss()
    got, took, end = download(rig.tcp_port, size, 20)
    held = srv.rss()
    for s in stallers:
        s.close()
    if got == size:
        speed = got / MiB / took
        honest = f"honest 32 MiB download completed at {speed:.0f} MB/s vs {alone:.0f} MB/s alone (×{speed / alone:.2f})"
    else:
        honest = f"honest download NOT completed: {got / MiB:.1f} of 32 MiB in {took:.0f} s ({end})"
    return f"{sum(fed)}/{n} stalled visitors got their first 256 KiB; {honest}; server RSS {mb(base)} → {mb(held)}"


def http_exchange(port: int, request: bytes, timeout: float = 5.0) -> Tuple[str, bytes]:
    out = b""
    try:
        with connect(port, HONEST, timeout) as s:
            s.sendall(request)
            while True:
                c = s.recv(65536)
                if not c:
                    break
                out += c
    except OSError as exc:
        if not out:
            return type(exc).__name__, b""
    status = out.split(b"\r\n", 1)[0].split(b" ", 2)
    return (status[1].decode() if len(status) > 1 else "no answer"), out


def a8_log_injection(rig: Rig) -> str:
    srv = rig.server()
    rig.client()
    log0 = len(srv.text())
    # no spaces in the target, so a split on " " still finds three parts
    routed, _ = http_exchange(rig.http_port, b"GET /a\x1b[31mESC\nFORGED-LINE:admin-logged-in HTTP/1.1\r\nHost: app\r\n\r\n")
    miss, body = http_exchange(rig.http_port, b"GET /b HTTP/1.1\r\nHost: no\x1b[2Jsuch\r\n\r\n")
    time.sleep(0.5)
    log = srv.text()[log0:]
    forged = any(line.startswith(b"FORGED-LINE") for line in log.splitlines())
    esc_log, esc_body = b"\x1b" in log, b"\x1b" in body
    return (f"server log: raw ESC {'YES' if esc_log else 'no'}, forged line {'YES' if forged else 'no'}; "
            f"answers: {routed} (target with LF+ESC, Host app), {miss} (ESC in an unknown Host), raw ESC in that body "
            f"{'YES' if esc_body else 'no'}")


def a9_host_headers(rig: Rig) -> str:
    rig.server()
    rig.client()
    two, _ = http_exchange(rig.http_port, b"GET / HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n")
    space, _ = http_exchange(rig.http_port, b"GET / HTTP/1.1\r\nHost : app\r\n\r\n")
    absolute, _ = http_exchange(rig.http_port, b"GET http://app/ HTTP/1.1\r\nHost: other\r\n\r\n")
    return f"two Host: {two}; `Host :` {space}; absolute-form to app with Host other: {absolute}"


def a10_token_in_argv(rig: Rig) -> str:
    secret = "argv-secret-token-4242"
    env = rig.env(token=False)
    srv = rig.server(["--token", secret], env=env)
    cli = rig.client(["--token", secret], env=env)
    time.sleep(0.3)
    out = []
    for name, p in (("server", srv), ("client", cli)):
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            readable = secret.encode() in f.read()
        warned = b"WARNING" in p.text() and b"token" in p.text().lower()
        out.append(f"{name}: token {'READABLE' if readable else 'not in'} /proc/PID/cmdline"
                   f"{' (warned)' if warned else ''}")
    return "; ".join(out)


def a11_kill_client(rig: Rig) -> str:
    rig.server()
    cli = rig.client()
    size = 400 * MiB
    got, how = 0, "eof"
    try:
        with connect(rig.tcp_port, HONEST, 10) as s:
            s.sendall(b"DL %d\n" % size)
            killed = False
            while True:
                c = s.recv(1 << 20)
                if not c:
                    break
                got += len(c)
                if got >= 20 * MiB and not killed:
                    cli.kill(signal.SIGKILL)
                    killed = True
    except OSError as exc:
        how = type(exc).__name__
    if how == "eof":
        return f"visitor saw a clean FIN (EOF) after {got / MiB:.0f} of {size // MiB} MiB: a truncated transfer looks complete"
    return f"visitor's connection aborted ({how}, i.e. RST) after {got / MiB:.0f} of {size // MiB} MiB"


def a12_credit_overflow(rig: Rig) -> str:
    rig.server()
    s, r = authed(rig.port, "app", src=HONEST)
    visitor = connect(rig.tcp_port, HONEST, 5)
    s.settimeout(5)
    while True:  # the OpenStream for the visitor
        kind, body = r.frame()
        if kind == 0 and body[0] == 4:
            sid, _ = read_varint(body, 1)
            break
    s.sendall(plugin("ft.flow/1", struct.pack(">II", sid, 0x7FFFFFFF)) + heartbeat(7))
    s.settimeout(0.5)
    reset, alive, deadline = None, False, time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            try:
                kind, body = r.frame()
            except socket.timeout:
                continue
            if kind == 0 and body[0] == 10:
                esid, msg = describe_error(body)
                if esid == sid:
                    reset = msg
            if kind == 0 and body[0] == 9:
                alive = True
    except (OSError, EOFError):
        alive = False
    visitor.settimeout(1.0)
    try:
        vis = "EOF" if visitor.recv(1) == b"" else "data"
    except socket.timeout:
        vis = "still open"
    except OSError as exc:
        vis = f"RST ({type(exc).__name__})"
    visitor.close()
    s.close()
    if reset is None:
        return (f"credit of 2^31−1 on a stream with 256 KiB window: accepted silently (no reset, no error frame); "
                f"session {'alive (heartbeat answered)' if alive else 'ended'}; visitor {vis}")
    return (f"stream reset by the server ({printable(reset.encode(), 80)!r}); session "
            f"{'alive (heartbeat answered)' if alive else 'ended'}; visitor {vis}")


def a13_fd_exhaustion(rig: Rig) -> str:
    limit = 300

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    srv = rig.server(preexec=low_nofile)
    rig.client()
    log0 = len(srv.text())
    base = srv.fds()
    visitors = []
    for _ in range(400):
        try:
            v = socket.socket()
            v.bind((ATTACKER, 0))
            v.setblocking(False)
            v.connect_ex(("127.0.0.1", rig.tcp_port))
            visitors.append(v)
        except OSError:
            break
    time.sleep(2.0)
    peak = srv.fds()
    ok, took, what = honest_handshake(rig.port, timeout=5, tunnel_id="second")
    time.sleep(1.0)  # let the pause-and-log interval show up
    lines = [line for line in new_lines(srv, log0) if b"session" not in line or b"WARNING" in line]
    warn = [line for line in lines if b"WARNING" in line or b"ERROR" in line or b"descriptor" in line.lower()]
    for v in visitors:
        v.close()
    first = printable(warn[0], 140) if warn else ""
    return (f"{len(visitors)} visitor connects, server fds {base} → {peak} (limit {limit}); new tunnel client "
            f"{'connected in ' + ms(took) if ok else 'REFUSED (' + what + ', ' + ms(took) + ')'}; "
            f"{len(warn)} warning/error lines logged{': ' + repr(first) if first else ''}")


def a14_tls_mismatch(rig: Rig, certs: str) -> str:
    out = []
    # a TLS client against a plaintext server
    rig.server()
    cli = rig.client(["--tls", "--tls-ca", os.path.join(certs, "ca.pem"), "--tls-server-name", "localhost"], wait=False)
    time.sleep(3.0)
    out.append("TLS client → plaintext server: " + client_complaint(cli))
    rig.close()
    rig.procs.clear()
    # a plaintext client against a TLS server
    rig.server(["--tls-cert", os.path.join(certs, "server.pem"), "--tls-key", os.path.join(certs, "server.key")])
    cli = rig.client(wait=False)
    time.sleep(3.0)
    out.append("plaintext client → TLS server: " + client_complaint(cli))
    return " / ".join(out)


def client_complaint(cli: Proc) -> str:
    for line in cli.text().splitlines():
        if b" INFO " in line or not line.strip() or line.startswith(b"connected"):
            continue
        return repr(printable(line, 260))
    return "(nothing logged but INFO)"


ATTACKS: List[Tuple[int, str, Callable]] = [
    (1, "one 16 MiB first frame before auth (OpenStream, ~8M empty headers)", a1_big_first_frame),
    (2, "40 connections each sending 15 of a 16 MiB frame before auth", a2_forty_partial_frames),
    (3, "600 silent sockets from one address, refilled, 10 s; 40 honest clients meanwhile", a3_silent_sockets),
    (4, "valid token: OpenStream + Error reset, fast (≤200k cycles / 20 s)", a4_rapid_reset),
    (5, "valid token, never reads: flood heartbeats / data for unknown streams (8 s each)", a5_noread_flood),
    (6, "three sessions each moving 100 MiB (10 × 10 MiB) through the TCP ingress, then closed", a6_three_sessions),
    (7, "40 visitors stop reading mid-download on one tunnel; then an honest 32 MiB download", a7_stalled_visitors),
    (8, "bare LF / ESC in the request target (HTTP ingress)", a8_log_injection),
    (9, "two Host headers / `Host :` / absolute-form target", a9_host_headers),
    (10, "`--token` on the command line: /proc/PID/cmdline", a10_token_in_argv),
    (11, "kill -9 the client mid-download (TCP ingress visitor)", a11_kill_client),
    (12, "credit past 2^31−1 (ft.flow/1 update of 0x7FFFFFFF)", a12_credit_overflow),
    (13, "RLIMIT_NOFILE 300, 400 visitors to the TCP ingress; a new tunnel client", a13_fd_exhaustion),
    (14, "TLS client ↔ plaintext server and plaintext client ↔ TLS server", a14_tls_mismatch),
]


# ------------------------------------------------------------------ the local app

async def app_main(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            if first.startswith(b"DL "):
                n = int(first[3:].split(b"\n", 1)[0])
                block = b"\xab" * (256 * 1024)
                while n > 0:
                    writer.write(block[:n])
                    n -= min(n, len(block))
                    await writer.drain()
            elif re.match(rb"^[A-Z]+ ", first):
                while b"\r\n\r\n" not in first:
                    more = await reader.read(65536)
                    if not more:
                        break
                    first += more
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
            else:
                data_ = first
                while data_:
                    writer.write(data_)
                    await writer.drain()
                    data_ = await reader.read(65536)
        except (ConnectionError, OSError):
            pass
        writer.close()

    await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------ main

def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="python of the 'before' install")
    ap.add_argument("--after", help="python of the 'after' install")
    ap.add_argument("--only", help="comma-separated attack numbers")
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--app", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.app:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(app_main(args.app))
        return 0
    if not (args.before and args.after):
        ap.error("--before and --after are required")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    only = {int(x) for x in args.only.split(",")} if args.only else None
    versions = [("before", args.before), ("after", args.after)]
    for tag, py in versions:
        impl = subprocess.run([py, "-c", "import ferrotunnel.frames as f, ferrotunnel; print(f.IMPLEMENTATION, ferrotunnel.__file__)"],
                              capture_output=True, text=True).stdout.strip()
        print(f"{tag}: {py} codec={impl}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="ft-attacks-")
    certs = os.path.join(tmp, "certs")
    subprocess.run([args.after, "-m", "ferrotunnel", "certs", "--out", certs, "--name", "localhost", "--ip", "127.0.0.1"],
                   check=True, capture_output=True)
    rows = []
    t_all = time.monotonic()
    for num, title, fn in ATTACKS:
        if only and num not in only:
            continue
        cells = []
        for tag, py in versions:
            rig = Rig(py, f"a{num}-{tag}", tmp)
            t0 = time.monotonic()
            try:
                text = fn(rig, certs) if fn is a14_tls_mismatch else fn(rig)
            except Exception as exc:  # an attack that could not run says so in its cell
                text = f"could not measure: {type(exc).__name__}: {exc}"
            finally:
                rig.close()
            print(f"[{num} {tag} {time.monotonic() - t0:.1f}s] {text}", file=sys.stderr, flush=True)
            cells.append(text)
        rows.append(f"| {num} | {cell(title)} | {cell(cells[0])} | {cell(cells[1])} |")
    table = "\n".join(["| # | attack | before | after |", "|---|---|---|---|", *rows])
    print(table)
    print(f"(total {time.monotonic() - t_all:.0f} s; logs in {tmp})", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
