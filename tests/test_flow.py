"""One flow, two drivers: the same guard class and the same effects, sync and async."""

from __future__ import annotations

import asyncio
import threading

import pytest

import agent_meter.backends.memory
import agent_meter.testing
from agent_meter import BackendUnavailable, Meter, UsageLimitExceeded
from agent_meter.backends.base import (
    CatalogueBackend,
    LedgerFile,
    LocalBackend,
    RemoteBackend,
    ReservingBackend,
)
from agent_meter.flow import Effect, arun, local, run
from agent_meter.guard import AsyncGuard, Guard
from agent_meter.testing import MemoryBackend


def test_the_memory_backend_lives_with_the_backends() -> None:
    assert agent_meter.testing.MemoryBackend is agent_meter.backends.memory.MemoryBackend


def test_capabilities_are_declared(memory_backend: MemoryBackend, sqlite_backend: object) -> None:
    for backend in (memory_backend, sqlite_backend):
        assert isinstance(backend, LocalBackend)
        assert isinstance(backend, ReservingBackend)
        assert isinstance(backend, CatalogueBackend)
        assert not isinstance(backend, RemoteBackend)
    assert isinstance(sqlite_backend, LedgerFile)
    assert not isinstance(memory_backend, LedgerFile)


def test_guard_and_aguard_return_one_class(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    assert AsyncGuard is Guard
    assert type(meter.guard("cus_1", "web_search")) is Guard
    assert type(meter.aguard("cus_1", "web_search")) is Guard


async def test_one_guard_is_both_with_and_async_with(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    with meter.guard("cus_1", "web_search", call_id="sync") as call:
        pass
    async with meter.guard("cus_1", "web_search", call_id="async") as acall:
        pass
    with pytest.raises(RuntimeError), meter.aguard("cus_1", "web_search", call_id="fails"):
        raise RuntimeError
    assert call.billed == acall.billed == 1
    assert memory_backend.balances("cus_1")["credits"] == 98


async def test_a_refusal_is_the_same_under_both_drivers(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    memory_backend.deny(feature_id="web_search")
    with pytest.raises(UsageLimitExceeded), meter.guard("cus_1", "web_search"):
        pass
    with pytest.raises(UsageLimitExceeded):
        async with meter.guard("cus_1", "web_search"):
            pass
    denied = [event for event in memory_backend.events("cus_1") if event.kind == "denied"]
    assert len(denied) == 2


def _flow_with_a_local_effect(seen: list[str]):  # type: ignore[no-untyped-def]
    thread = yield local(lambda: threading.current_thread().name)
    seen.append(thread)
    try:
        yield local(_fail)
    except BackendUnavailable:
        seen.append("caught")
    return len(seen)


def _fail() -> None:
    raise BackendUnavailable("down")


async def test_local_effects_run_off_the_event_loop_thread() -> None:
    seen: list[str] = []
    assert await arun(_flow_with_a_local_effect(seen)) == 2
    assert seen[0] != threading.current_thread().name  # a worker thread
    assert seen[1] == "caught"  # the effect's exception was thrown into the flow


def test_the_sync_driver_runs_effects_in_the_callers_thread() -> None:
    seen: list[str] = []
    assert run(_flow_with_a_local_effect(seen)) == 2
    assert seen == [threading.current_thread().name, "caught"]


async def test_native_async_effects_are_awaited_on_the_loop() -> None:
    loop_thread = threading.current_thread().name

    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    def flow():  # type: ignore[no-untyped-def]
        return (yield Effect(lambda: "sync", where, ()))

    assert await arun(flow()) == loop_thread
    assert run(flow()) == "sync"
