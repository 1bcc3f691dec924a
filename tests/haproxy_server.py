"""A real ``haproxy`` for tests: ``deploy/haproxy.cfg`` with its addresses replaced by loopback
ports, run in the foreground, stopped by PID. Without the binary the test is skipped, or fails
under ``CI=true``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from redis_server import stop_by_pid

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


def haproxy_binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        why = "haproxy is not installed (apt-get install haproxy)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    assert path is not None
    return path


def _listening(port: int) -> bool:
    """Whether some socket listens on 127.0.0.1:``port`` (state LISTEN in /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == local and line.split()[3] == "0A" for line in f.readlines()[1:])


class HAProxy:
    """``frontends`` maps the deploy file's public ports (7835, 80, 9000) to loopback ports;
    ``nodes`` lists, per node, its ports by the same keys (7835 tunnel, 8080 HTTP, 9000 TCP)."""

    def __init__(self, frontends: Dict[int, int], nodes: List[Dict[int, int]]) -> None:
        self.binary = haproxy_binary()
        text = DEPLOY.read_text().replace("    maxconn 50000\n", "    maxconn 2000\n")  # this machine's fd limit
        # a line per connection (with its termination state) on stdout, kept in a file: ``log_text``
        text = text.replace("global\n", "global\n    log stdout format raw local0 info\n", 1)
        text = text.replace("defaults\n", "defaults\n    log global\n    option tcplog\n", 1)
        for public, port in frontends.items():
            text = text.replace(f"    bind :{public}\n", f"    bind 127.0.0.1:{port}\n")
        backend_port = {7835: 7835, 80: 8080, 9000: 9000}
        for i, ports in enumerate(nodes):
            for public, node_port in backend_port.items():
                text = text.replace(f"10.0.0.{i + 1}:{node_port}\n", f"127.0.0.1:{ports[node_port]}\n")
        assert "10.0.0." not in text.split("global", 1)[1], "deploy/haproxy.cfg has a server this helper cannot map"
        self._dir = tempfile.TemporaryDirectory(prefix="ft-haproxy-")
        self.config = Path(self._dir.name) / "haproxy.cfg"
        self.config.write_text(text)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.frontends = frontends

    def start(self, timeout: float = 10.0) -> "HAProxy":
        check = subprocess.run([self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = Path(self._dir.name) / "haproxy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config)], stdout=out,
                                         stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        # Listening is read from /proc/net/tcp, not tried with a connection: HAProxy would pass a
        # connection on to a node, which would take it for a visitor (a stream to a tunnel,
        # then an EOF with no data, in the node's log).
        for port in self.frontends.values():
            while not _listening(port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not listen on {port}: "
                                       f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}")
                time.sleep(0.05)
        return self

    def log_text(self) -> str:
        """HAProxy's log so far: a line per connection, with its termination state."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_by_pid(proc)

    def __enter__(self) -> "HAProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
