"""Every public type of ``ferrotunnel`` is exported and documented: each class in ``__all__`` has a
docstring, and so has every public method and property it defines or inherits from the package."""

from __future__ import annotations

import enum
import inspect
from typing import Dict, List

import ferrotunnel as ft

#: Methods in files this test's author could not edit when it was written (server/server.py,
#: client/reconnect.py): remove each entry once its docstring is written
#: (``test_pending_entries_still_undocumented`` lists the ones that are).
PENDING: set = set()


def public_classes() -> Dict[str, type]:
    out = {}
    for name in ft.__all__:
        obj = getattr(ft, name)
        if inspect.isclass(obj) and obj.__module__.startswith("ferrotunnel") \
                and not issubclass(obj, (BaseException, enum.Enum)):
            out[name] = obj
    return out


def undocumented() -> List[str]:
    missing = []
    for name, cls in public_classes().items():
        if not (cls.__doc__ or "").strip():
            missing.append(name)
        seen = set()
        for base in cls.__mro__:
            if not base.__module__.startswith("ferrotunnel"):
                continue
            for attr, value in vars(base).items():
                if attr.startswith("_") or attr in seen:
                    continue
                seen.add(attr)
                fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else \
                    value.fget if isinstance(value, property) else value
                if not (inspect.isfunction(fn) or inspect.isbuiltin(fn) or inspect.ismethoddescriptor(fn)):
                    continue
                if not (getattr(fn, "__doc__", None) or "").strip():
                    missing.append(f"{name}.{attr}")
    return missing


def test_every_public_method_has_a_docstring():
    assert sorted(set(undocumented()) - PENDING) == []


def test_pending_entries_still_undocumented():
    done = sorted(PENDING - set(undocumented()))
    if done:  # not a failure: other files are being documented while this list waits for a cleanup
        import warnings
        warnings.warn(f"documented now, remove from PENDING: {done}")


def test_the_public_api_is_exported():
    for name in ("StreamHandler", "VirtualStream", "Session", "TunnelClient", "TunnelServer", "HttpsIngress",
                 "as_address", "Address", "BytesLike", "READ_TO_EOF_LIMIT", "READ_LINE_LIMIT", "LimitExceededError"):
        assert name in ft.__all__ and hasattr(ft, name), name
    assert all(hasattr(ft, name) for name in ft.__all__)
    functions = [getattr(ft, n) for n in ft.__all__ if inspect.isfunction(getattr(ft, n))]
    assert functions and all((f.__doc__ or "").strip() for f in functions), \
        [f.__name__ for f in functions if not (f.__doc__ or "").strip()]


def test_the_docstring_check_can_fail():
    class Shown:
        """Documented."""

        def bare(self) -> None:
            pass

    Shown.__module__ = "ferrotunnel.fake"
    ft.Shown = Shown  # type: ignore[attr-defined]
    ft.__all__.append("Shown")
    try:
        assert "Shown.bare" in undocumented()
    finally:
        ft.__all__.remove("Shown")
        del ft.Shown  # type: ignore[attr-defined]
