"""glibc malloc settings for the ``server`` and ``client`` commands (the process is ours).

Tunnel and forwarded reads go into fresh buffers of up to 1 MiB under bulk traffic (aio/readsize.py),
and a buffer lives until the transport has written the payload views of it. With glibc's defaults
such buffers are mapped (or the heap top is trimmed after them) and their pages are faulted in
fresh, zero-filled, read after read: page faults were 12 % of a cluster node's CPU relaying bulk
data. Serving them from the heap and trimming its top only past ``MALLOC_TRIM_THRESHOLD`` cut a
node's CPU per byte by a quarter to a third (measured with bench/cluster_route.py's set-up). Freed
memory inside the heap would then stay with the process at its peak, so a thread gives free pages
back every ``MALLOC_TRIM_INTERVAL`` (``malloc_trim``): after a burst a process keeps its peak for
at most that long.

Only the command line applies this (an application embedding the package owns its process):
``FERROTUNNEL_MALLOC_TUNING=0`` turns it off, and malloc settings in the environment
(``GLIBC_TUNABLES`` with a ``glibc.malloc.`` tunable, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``) are left to decide alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from typing import Any, Mapping, Optional

__all__ = ["tune_malloc", "MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD", "MALLOC_TRIM_INTERVAL"]

#: Allocations below this come from the heap (glibc's default starts at 128 KiB).
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024
#: Freed memory at the top of the heap is given back to the system only beyond this.
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
#: Seconds between two ``malloc_trim(0)`` calls (free pages inside the heap go back to the system).
MALLOC_TRIM_INTERVAL = 10.0

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(env: Optional[Mapping[str, str]] = None) -> bool:
    """Apply the settings above and start the trimming thread; True if applied (Linux with
    glibc, not turned off)."""
    env = os.environ if env is None else env
    if env.get("FERROTUNNEL_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if ("glibc.malloc." in env.get("GLIBC_TUNABLES", "") or "MALLOC_TRIM_THRESHOLD_" in env
            or "MALLOC_MMAP_THRESHOLD_" in env):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    # (the trim threshold first: setting either one switches off glibc's own adjustment of both)
    if not (mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) and mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)):
        return False
    threading.Thread(target=_trim_every, args=(trim, MALLOC_TRIM_INTERVAL), name="ferrotunnel-malloc-trim",
                     daemon=True).start()
    return True


def _trim_every(trim: Any, interval: float) -> None:
    wake = threading.Event()  # never set: a sleep that is not a busy loop
    while True:
        wake.wait(interval)
        trim(0)
