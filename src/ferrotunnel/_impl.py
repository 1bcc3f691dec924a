"""Picks the compiled module or its pure-Python twin, in one place.

``FERROTUNNEL_NO_EXTENSIONS=1`` selects the twins. A missing compiled module falls back to its
twin with one warning; ``FERROTUNNEL_REQUIRE_EXTENSIONS=1`` (CI) makes that an ImportError.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Tuple

_warned = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


NO_EXTENSIONS = _flag("FERROTUNNEL_NO_EXTENSIONS")
REQUIRE_EXTENSIONS = _flag("FERROTUNNEL_REQUIRE_EXTENSIONS")


def load(compiled: str, twin: str) -> Tuple[ModuleType, str]:
    """Return (module, "c" or "py")."""
    global _warned
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"ferrotunnel.{compiled}"), "c"
        except ImportError as exc:
            if REQUIRE_EXTENSIONS:
                raise ImportError(
                    f"ferrotunnel.{compiled} is not built but FERROTUNNEL_REQUIRE_EXTENSIONS is set; "
                    "reinstall with a C compiler available (pip install .)"
                ) from exc
            if not _warned:
                _warned = True
                warnings.warn(
                    f"ferrotunnel's compiled modules are not available ({exc}); using the slower "
                    "pure-Python implementation. Reinstall with a C compiler to build them.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return importlib.import_module(f"ferrotunnel.{twin}"), "py"
