"""The public API is curated: pin the exported names so a change to them is deliberate."""

from __future__ import annotations

import subprocess
import sys

import agent_meter
import agent_meter.langchain
import agent_meter.testing


def test_exported_names_are_pinned() -> None:
    assert agent_meter.__all__ == sorted(agent_meter.__all__)
    assert set(agent_meter.__all__) == {
        "AgentMeterError",
        "AsyncBackend",
        "AutumnBackend",
        "Backend",
        "BackendError",
        "BackendUnavailable",
        "CheckResult",
        "ConfigError",
        "CustomerNotFound",
        "CustomerRef",
        "FailPolicy",
        "FeatureType",
        "GuardedCall",
        "InvalidUsage",
        "Meter",
        "Plan",
        "Pricing",
        "SQLiteBackend",
        "Strategy",
        "TokenFeatures",
        "TokenUsage",
        "TrackResult",
        "UsageEvent",
        "UsageLimitExceeded",
    }
    for name in agent_meter.__all__:
        assert getattr(agent_meter, name) is not None


def test_testing_module_exports_the_memory_backend() -> None:
    assert agent_meter.testing.__all__ == ["MemoryBackend", "RecordedCall"]


def test_backends_satisfy_the_protocols(memory_backend: object, sqlite_backend: object) -> None:
    for backend in (memory_backend, sqlite_backend):
        assert isinstance(backend, agent_meter.Backend)
        assert isinstance(backend, agent_meter.AsyncBackend)


def test_autumn_is_imported_only_on_use() -> None:
    code = (
        "import sys, agent_meter; assert 'autumn' not in sys.modules; "
        "agent_meter.AutumnBackend; assert 'autumn' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_langchain_names_resolve() -> None:
    for name in agent_meter.langchain.__all__:
        assert getattr(agent_meter.langchain, name) is not None
