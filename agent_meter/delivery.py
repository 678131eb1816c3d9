"""Delivering the outbox: in the background, with exponential back-off and jitter.

One daemon thread per meter delivers queued tracks (sync and async callers alike, so that
a sync ``flush()`` still delivers what an async caller queued after its event loop has
closed). A track the backend answers with 200 or 409 is done; one it cannot take now
(:class:`BackendUnavailable`) waits and is tried again later with the same key; one it
rejects for good is set aside with its reason and reported by ``flush()``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from agent_meter.errors import AgentMeterError, BackendUnavailable
from agent_meter.outbox import Outbox, OutboxEntry, Queued

__all__ = ["Deliverer", "backoff_delay"]

logger = logging.getLogger("agent_meter")


def backoff_delay(attempts: int, *, base: float, cap: float) -> float:
    """Seconds before attempt ``attempts + 1``: exponential, capped, with full jitter."""
    ceiling = min(cap, base * 2.0 ** min(attempts, 32))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not cryptography


class Deliverer:
    """Sends the outbox's tracks to the backend until each is acknowledged or set aside.

    Args:
        outbox: Where tracks wait.
        send: Delivers one track or lock finalize (the meter's backend call); raises on
            failure.
        clock: Unix time, for back-off.
        base_delay: First back-off, in seconds.
        max_delay: Longest back-off, in seconds.
        on_set_aside: Told of each track rejected for good (the meter's hooks); when
            omitted, it is logged.
    """

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[Queued], object],
        *,
        clock: Callable[[], float] = time.time,
        base_delay: float = 0.2,
        max_delay: float = 60.0,
        on_set_aside: Callable[[Queued, str], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self._on_set_aside = on_set_aside or _log_set_aside
        self._send = send
        self._clock = clock
        self._base = base_delay
        self._cap = max_delay
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._round_lock = threading.Lock()
        self._rejected: list[AgentMeterError] = []
        self._urgent = False  # the next round ignores back-off (a flush is waiting)
        self._rounds = 0
        self._round_done = threading.Condition()
        self.delivered = 0
        """Tracks acknowledged by the backend since this deliverer started."""

    # -- one round ---------------------------------------------------------------------------

    def deliver(self, entries: list[OutboxEntry], deadline: float | None = None) -> bool:
        """Try each entry once, in order; stop at the first sign the backend is down.

        Args:
            entries: The tracks to send.
            deadline: A ``time.monotonic()`` after which no further entry is started.

        Returns:
            False if the backend was unavailable or the deadline passed (the rest of
            ``entries`` was not tried).
        """
        self._rejected.extend(self.outbox.take_unreadable())
        for entry in entries:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            request = entry.request
            try:
                self._send(request)
            except BackendUnavailable as exc:
                at = self._clock() + backoff_delay(entry.attempts, base=self._base, cap=self._cap)
                self.outbox.retry_later(request.idempotency_key, str(exc), at)
                return False
            except AgentMeterError as exc:
                self.outbox.set_aside(request.idempotency_key, f"{type(exc).__name__}: {exc}")
                self._on_set_aside(request, str(exc))
                self._rejected.append(exc)
            except Exception as exc:  # a bug in a backend must not kill delivery
                logger.exception(
                    "agent_meter: unexpected error delivering %s", request.idempotency_key
                )
                at = self._clock() + backoff_delay(entry.attempts, base=self._base, cap=self._cap)
                self.outbox.retry_later(request.idempotency_key, repr(exc), at)
                return False
            else:
                self.outbox.delivered(request.idempotency_key)
                self.delivered += 1
        return True

    def drain(self, customer_id: str) -> bool:
        """Deliver every track of ``customer_id`` queued so far, now, ignoring back-off.

        Tracks other threads queue meanwhile are delivered too when they are there to be
        seen, but their arrival is no failure: the backend is only unavailable when a
        delivery fails (reporting an outage because another call was quicker made
        healthy backends look down under concurrency).

        Returns:
            True when the backend has seen every track queued before the call; False only
            when a delivery failed for want of the backend.
        """
        with self._round_lock:
            entries = self.outbox.due(self._clock(), customer_id=customer_id, limit=10_000)
            return self.deliver(entries)

    def run_once(self, *, ignore_backoff: bool = False, deadline: float | None = None) -> bool:
        """Deliver what is due; returns False if the backend was unavailable."""
        with self._round_lock:
            now = float("inf") if ignore_backoff else self._clock()
            while True:
                entries = self.outbox.due(now, limit=100)
                if not entries:
                    self._rejected.extend(self.outbox.take_unreadable())
                    return True
                if not self.deliver(entries, deadline):
                    return False

    # -- the background thread -----------------------------------------------------------------

    def wake(self) -> bool:
        """Make the background thread look at the outbox now (starting it if needed).

        Returns:
            False when no thread could be started (the interpreter is shutting down).
        """
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._stop.clear()
                    thread = threading.Thread(
                        target=self._loop, name="agent_meter-deliverer", daemon=True
                    )
                    try:
                        thread.start()
                    except RuntimeError:  # "can't create new thread at interpreter shutdown"
                        return False
                    self._thread = thread
        self._wake.set()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            urgent, self._urgent = self._urgent, False
            timeout = 5.0
            try:
                self.run_once(ignore_backoff=urgent)
                due = self.outbox.next_due()
                if due is not None:
                    timeout = min(max(due - self._clock(), 0.001), 5.0)
            except AgentMeterError as exc:  # the outbox file itself failed; try again later
                logger.warning("agent_meter: outbox delivery round failed: %s", exc)
            except Exception:  # the only thread that delivers must never die of a bug
                logger.exception("agent_meter: outbox delivery round failed")
            with self._round_done:
                self._rounds += 1
                self._round_done.notify_all()
            self._wake.wait(timeout)

    def flush(self, timeout: float | None = None) -> int:
        """Deliver everything queued, retrying with back-off until done or ``timeout``.

        The background thread does the sending; this waits for it, so that ``timeout`` is
        kept even while a request hangs (the request goes on in the background, and its
        track stays queued until the backend acknowledges it).

        Returns:
            How many tracks are still undelivered.

        Raises:
            AgentMeterError: The first of the tracks the backend rejected for good since
                the last flush (``ConfigError`` for an unknown feature, ...).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            with self._round_done:
                seen = self._rounds
            self._urgent = True
            if not self.wake():  # no thread at interpreter shutdown: deliver from here
                self.run_once(ignore_backoff=True, deadline=deadline)
            else:
                self._wait_for_round(seen, deadline)
            if not self.outbox.pending() or _passed(deadline):
                break
            pause = backoff_delay(attempt, base=0.05, cap=1.0)
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
            attempt += 1
        self._rejected.extend(self.outbox.take_unreadable())
        rejected, self._rejected = self._rejected, []
        if rejected:
            raise rejected[0]
        return self.outbox.pending()

    def _wait_for_round(self, seen: int, deadline: float | None) -> None:
        """Wait until the background thread finishes a round begun after ``seen``."""
        with self._round_done:
            # a round that was under way when we asked may predate our tracks: wait for 2
            while self._rounds < seen + 2 and not _passed(deadline):
                remaining = None if deadline is None else deadline - time.monotonic()
                self._round_done.wait(remaining)
                if self._rounds == seen + 1 and not self.outbox.pending():
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread, waiting at most ``timeout`` seconds for it.

        What is queued stays in the outbox; a request under way may still complete.
        """
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(timeout, 0))


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _log_set_aside(request: Queued, error: str) -> None:
    logger.error(
        "agent_meter: track %s (%s x %s for %s) rejected for good and set aside: %s",
        request.idempotency_key,
        request.value,
        request.feature_id,
        request.customer_id,
        error,
    )
