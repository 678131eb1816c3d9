"""Billing backends: where checks are answered and usage is recorded.

Every backend implements :class:`Backend` (sync) and :class:`AsyncBackend` (async) with
the same semantics, Autumn's (DESIGN.md §2).
"""

from typing import TYPE_CHECKING, Any

from agent_meter.backends.base import AsyncBackend, Backend, FullBackend, ReservingBackend
from agent_meter.backends.sqlite import SQLiteBackend

if TYPE_CHECKING:
    from agent_meter.backends.autumn import AutumnBackend

__all__ = [
    "AsyncBackend",
    "AutumnBackend",
    "Backend",
    "FullBackend",
    "ReservingBackend",
    "SQLiteBackend",
]


def __getattr__(name: str) -> Any:
    if name == "AutumnBackend":  # imported on use: autumn-py brings requests and aiohttp
        from agent_meter.backends.autumn import AutumnBackend  # noqa: PLC0415

        return AutumnBackend
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
