"""glibc malloc settings for the ``server`` and ``client`` commands (the process is ours).

Tunnel and forwarded reads go into fresh buffers of up to 1 MiB under bulk traffic (aio/readsize.py),
and a buffer lives until the transport has written the payload views of it. With glibc's defaults
such buffers are mapped (or the heap top is trimmed after them) and their pages are faulted in
fresh, zero-filled, read after read: page faults were 12 % of a cluster node's CPU relaying bulk
data. Serving them from the heap and trimming it only past ``MALLOC_TRIM_THRESHOLD`` cut a node's
CPU per byte by a quarter to a third (docs/architecture.md). A process keeps up to that much
freed heap after a burst.

Only the command line applies this (an application embedding the package owns its process):
``FERROTUNNEL_MALLOC_TUNING=0`` turns it off, and a ``GLIBC_TUNABLES`` that sets any malloc
tunable is left to decide alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping, Optional

__all__ = ["tune_malloc", "MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD"]

#: Allocations below this come from the heap (glibc's default starts at 128 KiB).
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024
#: Freed memory at the top of the heap is given back to the system only beyond this.
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(env: Optional[Mapping[str, str]] = None) -> bool:
    """Apply the settings above; True if they were applied (Linux with glibc, not turned off)."""
    env = os.environ if env is None else env
    if env.get("FERROTUNNEL_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # (the trim threshold first: setting either one switches off glibc's own adjustment of both)
    return bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
