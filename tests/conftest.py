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
