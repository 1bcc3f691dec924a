"""A real ``redis-server`` for tests, on a free 127.0.0.1 port, with no persistence.

    with RedisServer(password="pw") as r:   # r.url: redis://:pw@127.0.0.1:PORT/0
        r.stop()                            # an outage (SIGTERM by pid, then SIGKILL)
        r.start()                           # back on the same port, empty

Without the binary (or redis-py, the client) the test is skipped, or fails under ``CI=true``
(CI must install both).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        _missing("redis-server is not installed (apt-get install redis-server)")
    assert path is not None
    return path


def require_redis_py() -> None:
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        _missing("redis-py is not installed (pip install '.[cluster]')")


def stop_by_pid(proc: "Optional[subprocess.Popen[bytes]]") -> None:
    """SIGTERM by pid, SIGKILL if it has not exited within 5 s (nothing if it is gone already)."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisServer:
    """One ``redis-server`` process; ``start()`` again after ``stop()`` reuses the port."""

    def __init__(self, password: Optional[str] = None, port: Optional[int] = None) -> None:
        self.binary = redis_binary()
        require_redis_py()
        self.password = password
        self.port = port or _free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._dir = tempfile.TemporaryDirectory(prefix="ft-redis-")
        self.log = Path(self._dir.name) / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        argv: List[str] = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", self._dir.name, "--logfile", str(self.log)]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING:\n{tail}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        cmds = (_resp("AUTH", self.password) if self.password else b"") + _resp("PING")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(cmds)
                got = b""
                while b"+PONG" not in got:
                    chunk = s.recv(4096)
                    if not chunk or chunk.startswith(b"-"):
                        return False
                    got += chunk
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it has not exited within 5 s."""
        proc, self.proc = self.proc, None
        stop_by_pid(proc)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._dir.cleanup()
