"""bench/pymux.py carries bytes both ways, half-closes and many streams (a floor that dropped
bytes would be no floor): ``python -m pytest bench/test_pymux.py``."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import e2e
import speed_procs as sp

HERE = os.path.dirname(os.path.abspath(__file__))


def test_pymux_echoes_and_half_closes_on_many_streams():
    with tempfile.TemporaryDirectory() as d, sp.Procs(d) as procs:
        backend_port = e2e.free_port()
        procs.popen("backend", [sys.executable, e2e.__file__, "--role", "backend", str(backend_port)])
        time.sleep(0.5)
        tunnel, ingress = e2e.free_port(), e2e.free_port()
        cmd = [sys.executable, os.path.join(HERE, "pymux.py")]
        server = procs.popen("pymux-server", cmd + ["server", str(tunnel), str(ingress)])
        time.sleep(0.3)
        procs.popen("pymux-client", cmd + ["client", str(tunnel), str(backend_port)])
        sp.wait_for_line(server, r"^ready")
        for i in range(50):
            payload = os.urandom(1 + i * 3000)
            with socket.create_connection(("127.0.0.1", ingress), timeout=10) as s:
                s.sendall(b"E" + payload)
                s.shutdown(socket.SHUT_WR)  # the backend echoes, then closes at our EOF
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            assert got == payload
