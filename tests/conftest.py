from __future__ import annotations

import importlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from ferrotunnel import frames as F

VECTORS = Path(__file__).parent / "vectors" / "ferrotunnel-v1.0.2-sample.json"


def load_vectors() -> list[dict[str, Any]]:
    return json.loads(VECTORS.read_text())["cases"]


def _member(enum_cls: Any, name: str) -> Any:
    return enum_cls[re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).upper()]


def frame_from_json(obj: dict[str, Any]) -> Any:
    """Build a frame object from the vectors' serde externally-tagged JSON."""
    (variant, f), = obj.items()
    if variant == "Handshake":
        return F.Handshake(token=f["token"], tunnel_id=f["tunnel_id"], min_version=f["min_version"],
                           max_version=f["max_version"], capabilities=f["capabilities"])
    if variant == "HandshakeAck":
        return F.HandshakeAck(session_id=uuid.UUID(f["session_id"]), status=_member(F.HandshakeStatus, f["status"]),
                              version=f["version"], server_capabilities=f["server_capabilities"])
    if variant == "Register":
        return F.Register(service_name=f["service_name"], protocol=_member(F.Protocol, f["protocol"]), metadata=f["metadata"])
    if variant == "RegisterAck":
        return F.RegisterAck(public_url=f["public_url"], status=_member(F.RegisterStatus, f["status"]))
    if variant == "OpenStream":
        return F.OpenStream(stream_id=f["stream_id"], protocol=_member(F.Protocol, f["protocol"]),
                            headers=[tuple(h) for h in f["headers"]], body_hint=f["body_hint"],
                            priority=F.StreamPriority[f["priority"].upper()])
    if variant == "StreamAck":
        return F.StreamAck(stream_id=f["stream_id"], status=_member(F.StreamStatus, f["status"]))
    if variant == "Data":
        return F.Data(stream_id=f["stream_id"], data=bytes.fromhex(f["data"]), end_of_stream=f["end_of_stream"])
    if variant == "CloseStream":
        r = f["reason"]
        if isinstance(r, dict):
            return F.CloseStream(stream_id=f["stream_id"], reason=F.CloseReason.ERROR, message=r["Error"])
        return F.CloseStream(stream_id=f["stream_id"], reason=_member(F.CloseReason, r))
    if variant in ("Heartbeat", "HeartbeatAck"):
        return getattr(F, variant)(timestamp=f["timestamp"])
    if variant == "Error":
        return F.Error(stream_id=f["stream_id"], code=_member(F.ErrorCode, f["code"]), message=f["message"])
    if variant == "PluginData":
        return F.PluginData(plugin_id=f["plugin_id"], data=bytes.fromhex(f["data"]))
    raise AssertionError(f"unknown variant {variant}")


def both_codecs() -> list[Any]:
    """The compiled codec (when built) and the twin, for parity tests."""
    mods = [importlib.import_module("ferrotunnel._frames_py")]
    try:
        mods.insert(0, importlib.import_module("ferrotunnel._frames"))
    except ImportError:
        pass
    return mods


@pytest.fixture(params=["compiled", "twin"])
def codec(request: Any) -> Any:
    """Each implementation explicitly (in addition to the selected one the suite runs against)."""
    name = "ferrotunnel._frames" if request.param == "compiled" else "ferrotunnel._frames_py"
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip("compiled codec not built")


# ---------------------------------------------------------------- event loops and tunnels

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import socket  # noqa: E402

import uvloop  # noqa: E402

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=list(LOOPS))
def run(request: Any) -> Any:
    """run(async_fn, timeout=...) executes a test body on uvloop and on the plain asyncio loop."""
    factory = LOOPS[request.param]

    def runner(fn: Any, timeout: float = 60.0) -> Any:
        async def wrapped() -> Any:
            async with asyncio.timeout(timeout):
                return await fn()

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(wrapped())

    runner.loop_name = request.param  # type: ignore[attr-defined]
    return runner


#: Ports free_port has handed out in this process: never handed out twice. (A port is free only
#: until someone binds it: two picks before either was bound could return the same one, and one
#: of two processes started together then failed with EADDRINUSE.)
_HANDED_OUT: set = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


async def echo_handler(stream: Any) -> None:
    """Echo everything, then half-close."""
    async for chunk in stream:
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()


@contextlib.asynccontextmanager
async def tunnel(handler: Any = echo_handler, *, server_config: Any = None, client_config: Any = None,
                 tunnel_id: str = "t1", token: str = "secret-token", server_kwargs: Any = None):
    """A TunnelServer and a connected TunnelClient; yields (server, client, server_side_session)."""
    import ferrotunnel as ft

    server = ft.TunnelServer(("127.0.0.1", 0), token, config=server_config or ft.ServerConfig(),
                             **(server_kwargs or {}))
    async with server:
        host, port = server.address
        client = ft.TunnelClient(f"{host}:{port}", token, tunnel_id=tunnel_id,
                                 config=client_config or ft.ClientConfig())
        task = asyncio.create_task(client.connect_and_run(handler))
        try:
            session = await server.wait_for_session(tunnel_id, timeout=10)
            while client.session is None:
                await asyncio.sleep(0.01)
            yield server, client, session
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def read_frames(reader: Any, n: int, decoder: Any = None, timeout: float = 5.0) -> list:
    """Read until ``n`` frames arrived on a raw asyncio StreamReader."""
    dec = decoder or F.FrameDecoder()
    got: list = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            data = await reader.read(65536)
            if not data:
                break
            got += [_own(f) for f in dec.feed(data)]
    return got


def _own(frame: Any) -> Any:
    if isinstance(frame, F.Data):
        return F.Data(stream_id=frame.stream_id, data=bytes(frame.data), end_of_stream=frame.end_of_stream)
    return frame
