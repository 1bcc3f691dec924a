"""FerroTunnel protocol v1 wire codec: frame classes, enums, ``encode`` and ``FrameDecoder``.

The codec is the compiled ``_frames`` module or its pure-Python twin; ``IMPLEMENTATION`` says
which one is active (``"c"`` or ``"py"``).

Decoder limits: ``FrameDecoder(max_frame_size, max_control_frame)`` refuses an oversized frame from
its 5-byte header; ``decode_control`` enforces the named caps ``MAX_STRING``, ``MAX_HEADERS``,
``MAX_HEADER_BYTES``, ``MAX_METADATA`` and ``MAX_CAPABILITIES_WIRE`` (exported here from ``_model``)
before it allocates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _impl
from ._model import *  # noqa: F401,F403
from ._model import __all__ as _model_all
from .errors import FrameError

if TYPE_CHECKING:  # type checkers read the twin, which has the same signatures
    from ._frames_py import (
        SCAN_FIELDS,
        FrameDecoder,
        decode_control,
        encode,
        encode_data_header,
        encode_data_header_into,
        scan_frames,
    )
    IMPLEMENTATION: str
else:
    _mod, IMPLEMENTATION = _impl.load("_frames", "_frames_py")
    encode = _mod.encode
    encode_data_header = _mod.encode_data_header
    encode_data_header_into = _mod.encode_data_header_into
    decode_control = _mod.decode_control
    scan_frames = _mod.scan_frames
    FrameDecoder = _mod.FrameDecoder
    SCAN_FIELDS = _mod.SCAN_FIELDS

__all__ = list(_model_all) + [
    "IMPLEMENTATION",
    "FrameError",
    "encode",
    "encode_data_header",
    "encode_data_header_into",
    "decode_control",
    "scan_frames",
    "FrameDecoder",
    "SCAN_FIELDS",
]
