"""LLM reservations on Autumn's ``lock`` strategy, replayed from recorded HTTP.

On Autumn an LLM call is reserved by a v2 lock of its estimate and settled by a finalize:
``confirm`` with ``override_value`` = the tokens the provider reported, or ``release`` when
the call failed (the cassettes' README, facts 11 and 18). The recordings lock 5,000
``llm_tokens`` (5 credits of 100), confirm 1,234 (98.766 left) or release (100 left); the
adapters here reserve a fixed 5,000-token estimate so the recorded answers are the ones
Autumn gives to these calls. Lock ids are made per attempt from the call key, so requests
are matched on route and order, and every body sent is asserted here: the lock id of the
finalize is the one locked, and it is derived from the LLM call's key.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent_meter import Meter
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.hooks import Admitted, Event
from agent_meter.keys import idempotency_key
from agent_meter.openai import wrap_client
from tests.autumn_helpers import PRICING, REPLAY_KEY, replay
from tests.langchain_token_helpers import ScriptedChatModel, reply
from tests.openai_helpers import chat_completion

ESTIMATE = 5000  # tokens: the recorded lock of 5 credits
OPENAI = "api.openai.com"
RUN = uuid.UUID("00000000-0000-4000-8000-000000001234")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """(path, JSON body) of every request sent to Autumn, in order, sync and async."""
    requests: list[tuple[str, dict[str, Any]]] = []

    def keep(request: httpx.Request) -> None:
        if request.url.host != OPENAI:
            requests.append((request.url.path, json.loads(request.content or b"{}")))

    send, asend = httpx.Client.send, httpx.AsyncClient.send

    def spy(self: httpx.Client, request: httpx.Request, **options: Any) -> httpx.Response:
        keep(request)
        return send(self, request, **options)

    async def aspy(
        self: httpx.AsyncClient, request: httpx.Request, **options: Any
    ) -> httpx.Response:
        keep(request)
        return await asend(self, request, **options)

    monkeypatch.setattr(httpx.Client, "send", spy)
    monkeypatch.setattr(httpx.AsyncClient, "send", aspy)
    return requests


def lock_meter(tmp_path: Path) -> Meter:
    backend = AutumnBackend(REPLAY_KEY, max_retries=0, lock_expiry=None)
    meter = Meter(backend, pricing=PRICING, outbox=tmp_path / "outbox.db")
    assert meter.strategy == "lock"  # Autumn's default
    return meter


def remaining(meter: Meter, customer_id: str) -> float | None:
    backend = meter.backend
    assert isinstance(backend, AutumnBackend)
    return backend.locks.check(customer_id, "web_search").balance


def lock_id_of(body: dict[str, Any], customer_id: str, call_id: str) -> str:
    """The lock id sent, checked to be the LLM call's ``lock`` key plus an attempt."""
    lock_id = body["lock"]["lock_id"]
    assert isinstance(lock_id, str)
    prefix = idempotency_key(customer_id, "llm_tokens", call_id, "lock")
    assert lock_id.startswith(f"{prefix}.")
    assert len(lock_id) > len(prefix) + 1  # a fresh attempt: a lock id is never reused
    return lock_id


def lock_body(customer_id: str) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "feature_id": "llm_tokens",
        "required_balance": ESTIMATE,
        "lock": {"enabled": True},
    }


def without_lock_id(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "lock": {k: v for k, v in body["lock"].items() if k != "lock_id"}}


def test_the_handler_locks_the_estimate_and_confirms_the_reported_tokens(
    tmp_path: Path, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    cus = "cus_lock_override_value"
    with replay().use_cassette("lock_override_value.yaml") as played:
        meter = lock_meter(tmp_path)
        handler = meter.callback_handler(estimate=ESTIMATE, customer_id=cus)
        model = ScriptedChatModel(replies=[reply(tokens=(234, 1000))])
        model.invoke("hi", config={"callbacks": [handler], "run_id": RUN})
        assert meter.flush(timeout=10) == 0  # the confirm waits in the outbox
        final = remaining(meter, cus)
        meter.close()
    assert played.all_played
    assert final == pytest.approx(98.766)  # 1,234 tokens charged, not the 5,000 held
    paths = [path for path, _ in sent]
    assert paths == [
        "/v1/customers.get_or_create",
        "/v1/balances.check",
        "/v1/balances.finalize",
        "/v1/balances.check",
    ]
    (_, lock), (_, finalize) = sent[1], sent[2]
    assert without_lock_id(lock) == lock_body(cus)
    lock_id = lock_id_of(lock, cus, str(RUN))  # the handler keys a call by its run id
    assert finalize == {"lock_id": lock_id, "action": "confirm", "override_value": 1234}


def admitted_call_ids(events: list[Event]) -> list[str]:
    return [event.call.call_id for event in events if isinstance(event, Admitted)]


async def test_an_async_client_request_holds_its_lock_while_it_runs_then_confirms(
    tmp_path: Path, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    cus = "cus_lock_confirm"
    during: list[float | None] = []
    with replay().use_cassette("lock_confirm.yaml", ignore_hosts=[OPENAI]) as played:
        meter = lock_meter(tmp_path)
        events: list[Event] = []
        meter.add_hook(events.append)

        def answer(request: httpx.Request) -> httpx.Response:
            during.append(remaining(meter, cus))  # the estimate is held while the call runs
            return httpx.Response(200, json=chat_completion(usage=(234, 1000)))

        client = wrap_client(
            openai.AsyncOpenAI(
                api_key="sk-test",
                http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)),  # type: ignore[arg-type]
            ),
            meter,
            customer_id=cus,
            estimate=ESTIMATE,
        )
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert await meter.aflush(timeout=10) == 0
        final = remaining(meter, cus)
        await meter.aclose()
    assert played.all_played
    assert during == [95.0]
    assert final == pytest.approx(98.766)
    assert [path for path, _ in sent] == [
        "/v1/customers.get_or_create",
        "/v1/balances.check",
        "/v1/balances.check",
        "/v1/balances.finalize",
        "/v1/balances.check",
    ]
    (_, lock), (_, finalize) = sent[1], sent[3]
    assert without_lock_id(lock) == lock_body(cus)
    [call_id] = admitted_call_ids(events)
    lock_id = lock_id_of(lock, cus, call_id)
    assert finalize == {"lock_id": lock_id, "action": "confirm", "override_value": 1234}


def test_a_failed_request_releases_its_lock(
    tmp_path: Path, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    cus = "cus_lock_release"
    during: list[float | None] = []
    with replay().use_cassette("lock_release.yaml", ignore_hosts=[OPENAI]) as played:
        meter = lock_meter(tmp_path)
        events: list[Event] = []
        meter.add_hook(events.append)

        def answer(request: httpx.Request) -> httpx.Response:
            during.append(remaining(meter, cus))
            return httpx.Response(400, json={"error": {"message": "bad request"}})

        client = wrap_client(
            openai.OpenAI(
                api_key="sk-test",
                max_retries=0,
                http_client=httpx.Client(transport=httpx.MockTransport(answer)),  # type: ignore[arg-type]
            ),
            meter,
            customer_id=cus,
            estimate=ESTIMATE,
        )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert meter.flush(timeout=10) == 0
        final = remaining(meter, cus)
        meter.close()
    assert played.all_played
    assert (during, final) == ([95.0], 100.0)  # held while it ran, given back exactly
    (_, lock), (_, finalize) = sent[1], sent[3]
    assert without_lock_id(lock) == lock_body(cus)
    [call_id] = admitted_call_ids(events)
    assert finalize == {"lock_id": lock_id_of(lock, cus, call_id), "action": "release"}
