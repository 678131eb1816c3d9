"""Billing backends: where checks are answered and usage is recorded.

Every backend implements :class:`Backend` (sync) and :class:`AsyncBackend` (async) with
the same semantics, Autumn's (DESIGN.md §2).
"""

from agent_meter.backends.base import AsyncBackend, Backend
from agent_meter.backends.sqlite import SQLiteBackend

__all__ = ["AsyncBackend", "Backend", "SQLiteBackend"]
