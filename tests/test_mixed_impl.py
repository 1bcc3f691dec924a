"""A compiled end and a pure-Python end on one real socket.

The end in this process runs whichever implementation the suite runs against; the other end, a
subprocess (tests/procs.py), runs the other one: the pure-Python twins (FERROTUNNEL_NO_EXTENSIONS)
when this process is compiled, the compiled modules (FERROTUNNEL_REQUIRE_EXTENSIONS) when it is
not. Both roles are tried: this process as the client of a subprocess server, and as the server
of a subprocess client. Each end opens streams toward the other (``procs.exercise``: bulk each
way and both ways at once under flow control, 200 concurrent streams of random sizes and
priorities, half-close in both orders) and every byte is checked where it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

import ferrotunnel as ft
from conftest import free_port
from ferrotunnel.frames import IMPLEMENTATION
from procs import TOKEN, exercise, mixed_handler

PROCS = str(Path(__file__).with_name("procs.py"))

try:
    for _name in ("_frames", "_pool", "_sched"):
        importlib.import_module(f"ferrotunnel.{_name}")
except ImportError:
    pytest.skip("the compiled modules are not built: nothing to mix", allow_module_level=True)

OTHER = "py" if IMPLEMENTATION == "c" else "c"


def _other_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")}
    if OTHER == "py":
        env["FERROTUNNEL_NO_EXTENSIONS"] = "1"
    else:
        env["FERROTUNNEL_REQUIRE_EXTENSIONS"] = "1"
    return env


@contextlib.asynccontextmanager
async def other_end(role: str, port: int):
    """Start ``procs.py role port`` on the other implementation; yields a line reader."""
    proc = await asyncio.create_subprocess_exec(sys.executable, PROCS, role, str(port), env=_other_env(),
                                                stdout=asyncio.subprocess.PIPE)

    async def line(timeout: float) -> str:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError(f"{role} exited ({await proc.wait()}) before saying anything more")
        return raw.decode().strip()

    try:
        yield line
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _check(stats: dict, who: str) -> None:
    assert stats["flow_control"], f"{who}: {stats}"
    assert stats["sent"] >= 24 << 20 and stats["received"] >= 24 << 20, f"{who}: {stats}"


def _parse(report: str, who: str) -> dict:
    assert report.startswith("exercise ok "), f"{who}: {report}"
    return json.loads(report[len("exercise ok "):])


def test_client_here_server_on_the_other_implementation(run):
    async def body():
        port = free_port()
        async with other_end("mixed-server", port) as line:
            assert await line(30) == f"ready {OTHER}"
            client = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, tunnel_id="mixed")
            session = await client.connect(mixed_handler)  # serves the server-opened streams
            try:
                assert session.flow_control
                ours, theirs = await asyncio.gather(exercise(session), line(240))
                _check(ours, f"client ({IMPLEMENTATION})")
                _check(_parse(theirs, f"server ({OTHER})"), f"server ({OTHER})")
            finally:
                await client.close()
    run(body, timeout=300)


def test_server_here_client_on_the_other_implementation(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, stream_handler=mixed_handler) as server:
            async with other_end("mixed-client", server.address[1]) as line:
                assert await line(30) == f"connected {OTHER}"
                session = await server.wait_for_session("mixed", timeout=10)
                assert session.flow_control
                ours, theirs = await asyncio.gather(exercise(session), line(240))
                _check(ours, f"server ({IMPLEMENTATION})")
                _check(_parse(theirs, f"client ({OTHER})"), f"client ({OTHER})")
    run(body, timeout=300)
