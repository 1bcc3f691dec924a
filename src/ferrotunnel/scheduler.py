"""Outbound priority scheduler of a tunnel connection (compiled, with a pure-Python twin)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _impl

if TYPE_CHECKING:
    from ._sched_py import DEFAULT_COALESCE, DEFAULT_DRAIN_BUDGET, PriorityScheduler
    IMPLEMENTATION: str
else:
    _mod, IMPLEMENTATION = _impl.load("_sched", "_sched_py")
    PriorityScheduler = _mod.PriorityScheduler
    DEFAULT_DRAIN_BUDGET = _mod.DEFAULT_DRAIN_BUDGET
    DEFAULT_COALESCE = _mod.DEFAULT_COALESCE

__all__ = ["IMPLEMENTATION", "PriorityScheduler", "DEFAULT_DRAIN_BUDGET", "DEFAULT_COALESCE"]
