"""mypy on user code sees the real signatures of the public API (py.typed, twins as the types)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

USER_CODE = textwrap.dedent('''
    from ferrotunnel import frames as F
    from ferrotunnel.pool import acquire_bytes
    from ferrotunnel.scheduler import PriorityScheduler

    dec = F.FrameDecoder(max_frame_size=1024)
    ok: list = dec.feed(b"abc")
    wire: bytes = F.encode(F.Heartbeat(timestamp=1))
    buf: bytearray = acquire_bytes(10)
    PriorityScheduler().push_data(1, F.StreamPriority.HIGH, b"x")
    bad: int = F.encode(F.Heartbeat(timestamp=1))
    F.FrameDecoder(max_frame_size="big")
''')


def test_mypy_sees_public_signatures(tmp_path):
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy not installed")
    src = tmp_path / "user.py"
    src.write_text(USER_CODE)
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
                          "--no-error-summary", str(src)], capture_output=True, text=True, cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if "error" in ln]
    assert len(lines) == 2, out.stdout
    assert "Incompatible types in assignment" in lines[0] and ":11:" in lines[0]
    assert "max_frame_size" in lines[1] or "incompatible type" in lines[1]


def test_package_itself_type_checks(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
                          "--ignore-missing-imports", "-p", "ferrotunnel"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]


STREAM_CODE = textwrap.dedent('''
    import ferrotunnel as ft

    async def use(stream: ft.VirtualStream, session: ft.Session) -> None:
        stream.write(b"bytes")
        stream.write(bytearray(b"buf"))
        stream.write(memoryview(b"view"))
        stream.writelines([b"a", bytearray(b"b")])
        line: bytes = await stream.readline()
        part: bytes = await stream.readuntil(b"\\r\\n", limit=100)
        rest: bytes = await stream.read()
        peer = stream.get_extra_info("peername")
        async for s in session:
            s.write(b"x")
        ft.TunnelClient("127.0.0.1:7835", "token", local_addr=("127.0.0.1", 8000))
        ft.TunnelClient(("127.0.0.1", 7835), "token", local_addr="127.0.0.1:8000")
        stream.write("text")
        ft.TunnelClient(7835, "token")
''')


def test_mypy_refuses_text_for_stream_write(tmp_path):
    if subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode != 0:
        pytest.skip("mypy not installed")
    src = tmp_path / "streams.py"
    src.write_text(STREAM_CODE)
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
                          "--no-error-summary", str(src)], capture_output=True, text=True, cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if "error" in ln]
    assert len(lines) == 2, out.stdout
    assert ":17:" in lines[0] and '"write"' in lines[0] and '"str"' in lines[0], lines[0]
    assert ":18:" in lines[1] and "TunnelClient" in lines[1], lines[1]
