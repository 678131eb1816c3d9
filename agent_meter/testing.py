"""Test helpers for users of agent_meter: an in-memory backend that records every call.

:class:`MemoryBackend` lives with the other backends (:mod:`agent_meter.backends.memory`)
and is re-exported here, where tests usually import it.

Example:
    >>> from agent_meter.testing import MemoryBackend
    >>> backend = MemoryBackend(pricing=pricing)
    >>> backend.set_balance("cus_1", "credits", 1)
    >>> backend.fail(method="track", times=1)        # the next track raises BackendUnavailable
    >>> backend.deny(feature_id="web_search")        # checks of web_search answer allowed=False
    >>> [call.method for call in backend.calls]
"""

from agent_meter.backends.memory import MemoryBackend, RecordedCall

__all__ = ["MemoryBackend", "RecordedCall"]
