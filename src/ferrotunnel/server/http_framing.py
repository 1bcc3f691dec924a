"""HTTP/1.1 message bodies and answers at the HTTP ingress, without touching what they carry:
``Chunked`` finds where a chunked body ends (RFC 9112 §7.1), ``ResponseTracker`` follows the
responses on a tunnel stream to the requests sent on it (status line, Content-Length, chunked, no
body for HEAD/1xx/204/304, close-delimited, 101 Switching Protocols), so the ingress knows when
every request sent on a stream has been answered; ``scan_plain`` reads a plain request head (see
``http1.parse_plain``), ``rewrite_repeat`` writes the X-Forwarded-* lines into a repeated one in
place. Request heads: ``http1``.

They are the compiled kernel ``ferrotunnel.http_kernel`` or its pure-Python twin
``ferrotunnel.http_kernel_py``, whichever kind the codec uses (``frames.IMPLEMENTATION``:
``FERROTUNNEL_NO_EXTENSIONS=1`` selects the twins); ``IMPLEMENTATION`` says which. A compiled
codec without a built kernel falls back to the twin with a warning, or, under
``FERROTUNNEL_REQUIRE_EXTENSIONS=1``, is an ImportError. The limits (``MAX_CHUNK_LINE``,
``MAX_TRAILERS``, ``MAX_RESPONSE_HEAD``) and ``HeadError`` are defined once, in the twin.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Tuple

from .. import frames
from ..http_kernel_py import MAX_CHUNK_LINE, MAX_RESPONSE_HEAD, MAX_TRAILERS, HeadError

__all__ = ["HeadError", "Chunked", "ResponseTracker", "scan_plain", "rewrite_repeat", "IMPLEMENTATION",
           "MAX_CHUNK_LINE", "MAX_TRAILERS", "MAX_RESPONSE_HEAD"]


def _kernel() -> Tuple[ModuleType, str]:
    """The kernel of the kind the codec uses, as ``_impl.load`` picks the codec's."""
    if frames.IMPLEMENTATION == "c":
        try:
            return importlib.import_module("ferrotunnel.http_kernel"), "c"
        except ImportError as exc:
            if os.environ.get("FERROTUNNEL_REQUIRE_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no"):
                raise ImportError("ferrotunnel.http_kernel is not built but FERROTUNNEL_REQUIRE_EXTENSIONS is set; "
                                  "rebuild (python setup.py build_ext --inplace, or pip install .)") from exc
            warnings.warn(f"ferrotunnel.http_kernel is not built ({exc}); the HTTP ingress uses its slower "
                          "pure-Python twin. Rebuild the extensions to get it.", RuntimeWarning, stacklevel=2)
    return importlib.import_module("ferrotunnel.http_kernel_py"), "py"


if TYPE_CHECKING:  # type checkers read the twin, which has the same signatures
    from ..http_kernel_py import Chunked, ResponseTracker, rewrite_repeat, scan_plain
    IMPLEMENTATION: str
else:
    _mod, IMPLEMENTATION = _kernel()
    Chunked = _mod.Chunked
    ResponseTracker = _mod.ResponseTracker
    scan_plain = _mod.scan_plain
    rewrite_repeat = _mod.rewrite_repeat
