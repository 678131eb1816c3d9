"""wrap_client: every LLM request gated before it is sent, its tokens billed once after."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from agent_meter import AgentMeterError, ConfigError, Meter, SQLiteBackend, UsageLimitExceeded
from agent_meter.openai import (
    usage_from_chunk,
    usage_from_completion,
    usage_from_response,
    wrap_client,
)
from agent_meter.testing import MemoryBackend
from agent_meter.tokens import TokenUsage
from tests.openai_helpers import (
    API_BASE,
    ScriptedAPI,
    chat_completion,
    chunks,
    example_pricing,
    json_reply,
    response_object,
    sse,
    sse_reply,
)

CUSTOMER = "cus_llm"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
MODEL = "gpt-4o-mini"


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryBackend(pricing=example_pricing())
    else:
        sqlite = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
        yield sqlite
        sqlite.close()


@pytest.fixture
def meter(backend: Any) -> Meter:
    return Meter(backend)


def credits(backend: Any) -> float:
    return round(float(backend.balances(CUSTOMER)["credits"]), 6)


def sync_client(api: ScriptedAPI) -> OpenAI:
    return OpenAI(
        api_key="sk-test",
        base_url=API_BASE,
        # openai types http_client as its own httpx fork's client; httpx's works the same
        http_client=httpx.Client(transport=httpx.MockTransport(api)),  # type: ignore[arg-type]
        max_retries=0,
    )


def async_client(api: ScriptedAPI) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key="sk-test",
        base_url=API_BASE,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(api)),  # type: ignore[arg-type]
        max_retries=0,
    )


def tracks(backend: MemoryBackend) -> list[tuple[str, float]]:
    """What stayed billed per request and feature: its reservation with its settlement."""
    net: dict[tuple[str, str], float] = {}
    for event in backend.events():
        if event.kind in ("reserve", "track"):
            # the hold, adjust and refund keys of one call (a refund names its attempt)
            # (a hold settled later through the outbox refunds under <hold key>:confirm)
            key = re.sub(r":(confirm|release)$", "", event.idempotency_key or "")
            call = re.sub(r"\.r[0-9a-f]{12}$", "", key.rsplit(":", 1)[0])
            net[call, event.feature_id] = net.get((call, event.feature_id), 0.0) + event.value
    return [(feature, value) for (_, feature), value in net.items() if value]


# -- usage readers -------------------------------------------------------------------------


def test_usage_is_read_from_a_completion_a_chunk_and_a_response() -> None:
    completion = ChatCompletion.model_validate(chat_completion(usage=(1200, 630)))
    content, last = chunks(usage=(900, 100))
    response = openai.types.responses.Response.model_validate(response_object(usage=(300, 200)))

    assert usage_from_completion(completion) == TokenUsage(
        1200, 630, 1830, "gpt-4o-mini-2024-07-18"
    )
    assert usage_from_chunk(ChatCompletionChunk.model_validate(content[0])) is None
    assert usage_from_chunk(ChatCompletionChunk.model_validate(last)) == TokenUsage(
        900, 100, 1000, "gpt-4o-mini-2024-07-18"
    )
    assert usage_from_response(response) == TokenUsage(300, 200, 500, "gpt-4.1-2025-04-14")
    assert usage_from_completion(chat_completion(usage=None)) is None
    assert usage_from_response(response_object(usage=None)) is None


# -- sync client -------------------------------------------------------------------------


def test_a_completion_bills_its_total_tokens(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-a", usage=(1200, 630))))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content == "Hello!"
    assert credits(backend) == 100 - 1.83  # 1,830 tokens at 0.001 credit
    assert len(api.requests) == 1


def test_two_requests_answered_with_the_same_id_are_two_calls(meter: Meter, backend: Any) -> None:
    # Each request holds its own reservation, settled once: a server that reuses response
    # ids served (and its ledger counts) two calls, so both are billed.
    reply = chat_completion("chatcmpl-same", usage=(500, 500))
    api = ScriptedAPI(json_reply(reply), json_reply(reply))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert len(api.requests) == 2
    assert credits(backend) == 98


def test_a_stream_without_include_usage_asks_for_it_and_hides_the_usage_chunk(
    meter: Meter, backend: Any
) -> None:
    content, last = chunks("chatcmpl-s1", usage=(900, 100))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER, estimate=1500)

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert isinstance(stream, Stream)
    assert credits(backend) == 98.5  # the estimate is held until the usage arrives
    seen = list(stream)

    assert api.bodies[0]["stream_options"] == {"include_usage": True}
    assert [chunk.model_dump(exclude_unset=True) for chunk in seen] == content
    assert all(chunk.choices for chunk in seen)
    assert credits(backend) == 99  # 1,000 tokens, once


def test_a_stream_that_asked_for_usage_keeps_the_usage_chunk(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-s2", usage=(1500, 500))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    with client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        seen = list(stream)

    assert api.bodies[0]["stream_options"] == {"include_usage": True}
    assert len(seen) == len(content) + 1
    assert seen[-1].choices == []
    assert seen[-1].usage is not None
    assert seen[-1].usage.total_tokens == 2000
    assert credits(backend) == 98


def test_a_stream_whose_caller_turned_usage_off_is_still_billed(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-s3", usage=(700, 300))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    seen = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": False}
        )
    )

    assert api.bodies[0]["stream_options"] == {"include_usage": True}
    assert len(seen) == len(content)
    assert credits(backend) == 99


def test_a_caller_that_stops_at_finish_reason_still_pays(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-stop", usage=(800, 200))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    seen = []
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            seen.append(chunk)
            if chunk.choices[0].finish_reason:
                break

    assert len(seen) == len(content)
    assert credits(backend) == 99


def test_a_stream_closed_before_its_usage_is_billed_once_at_close() -> None:
    """Issue 14: closing early bills the tokens the server reports, at close, not at GC."""
    backend = MemoryBackend(pricing=example_pricing())
    content, last = chunks("chatcmpl-early", usage=(800, 200))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), Meter(backend), customer_id=CUSTOMER)

    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        first = next(iter(stream))
        assert backend.holds()  # only the reservation yet: the usage comes last

    assert first.choices[0].delta.content == "Hel"
    assert tracks(backend) == [("llm_tokens", 1000)]  # billed at exit, once
    stream.close()
    assert len(tracks(backend)) == 1


def test_a_stream_broken_off_before_any_usage_bills_nothing() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, _ = chunks("chatcmpl-early")
    api = ScriptedAPI(sse_reply(sse(content)))
    client = wrap_client(sync_client(api), Meter(backend), customer_id=CUSTOMER)

    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        first = next(iter(stream))

    assert first.choices[0].delta.content == "Hel"
    assert tracks(backend) == []  # the reservation was given back when the stream closed
    assert credits(backend) == 100
    assert backend.holds() == []


def test_a_server_repeating_cumulative_usage_is_billed_its_last_count_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, _ = chunks("chatcmpl-cumulative")
    for n, chunk in enumerate(content, start=1):
        chunk["usage"] = {"prompt_tokens": 100, "completion_tokens": n, "total_tokens": 100 + n}
    api = ScriptedAPI(sse_reply(sse(content)))
    client = wrap_client(sync_client(api), Meter(backend), customer_id=CUSTOMER)

    seen = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    assert len(seen) == len(content)
    assert tracks(backend) == [("llm_tokens", 100 + len(content))]


def test_a_customer_without_credit_sends_no_request(meter: Meter, backend: Any) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    api = ScriptedAPI()
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    with pytest.raises(UsageLimitExceeded, match="llm_tokens is unavailable"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(UsageLimitExceeded):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(UsageLimitExceeded):
        client.responses.create(model=MODEL, input="hi")

    assert api.requests == []
    assert credits(backend) == 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
def test_an_openai_error_bills_nothing(status: int, error: type[Exception]) -> None:
    backend = MemoryBackend(pricing=example_pricing())
    body = {"error": {"message": "nope", "type": "invalid_request_error", "code": None}}
    api = ScriptedAPI(json_reply(body, status))
    client = wrap_client(sync_client(api), Meter(backend), customer_id=CUSTOMER)

    with pytest.raises(error):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert len(api.requests) == 1
    assert tracks(backend) == []
    assert credits(backend) == 100


def test_a_plain_response_bills_its_total_tokens(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(response_object("resp_a", usage=(300, 200))))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    response = client.responses.create(model="gpt-4.1", input="Say hi")

    assert response.output_text == "Hi there."
    assert credits(backend) == 99.5


def test_a_streamed_response_is_billed_on_its_completed_event(meter: Meter, backend: Any) -> None:
    done = response_object("resp_s", usage=(600, 400))
    events = [
        {"type": "response.created", "sequence_number": 0, "response": {**done, "usage": None}},
        {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "Hi there.",
            "logprobs": [],
        },
        {"type": "response.completed", "sequence_number": 2, "response": done},
    ]
    api = ScriptedAPI(sse_reply(sse(events, named=True)))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    seen = [
        event.type for event in client.responses.create(model="gpt-4.1", input="x", stream=True)
    ]

    assert seen == ["response.created", "response.output_text.delta", "response.completed"]
    assert "stream_options" not in api.bodies[0]
    assert credits(backend) == 99


def test_with_raw_response_is_metered_and_returns_the_raw_response(
    meter: Meter, backend: Any
) -> None:
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-raw", usage=(2000, 0))))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    raw = client.with_raw_response.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert raw.http_response.status_code == 200
    assert raw.parse().id == "chatcmpl-raw"
    assert credits(backend) == 98


def test_parse_is_metered_and_returns_the_parsed_object(meter: Meter, backend: Any) -> None:
    class Greeting(pydantic.BaseModel):
        text: str

    reply = chat_completion("chatcmpl-parse", content='{"text": "hi"}', usage=(600, 400))
    api = ScriptedAPI(json_reply(reply))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Greeting)

    assert parsed.choices[0].message.parsed == Greeting(text="hi")
    assert credits(backend) == 99


def test_the_stream_helper_is_metered(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-helper", usage=(400, 600))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    with client.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")

    assert text == "Hello!"
    assert api.bodies[0]["stream_options"] == {"include_usage": True}
    assert credits(backend) == 99


def test_other_attributes_and_options_are_the_clients(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-opt", usage=(1000, 0))))
    inner = sync_client(api)
    client = wrap_client(inner, meter, customer_id=CUSTOMER)

    assert client.api_key == "sk-test"
    assert client.models is inner.models
    assert str(client.base_url) == f"{API_BASE}/"
    client.with_options(timeout=5).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert credits(backend) == 99  # the copy is metered too
    assert inner.chat.completions.create is not client.chat.completions.create


def test_split_input_and_output_features() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-split", usage=(1000, 1000))))
    client = wrap_client(
        sync_client(api),
        Meter(backend),
        customer_id=CUSTOMER,
        input_feature_id="llm_input_tokens",
        output_feature_id="llm_output_tokens",
    )

    client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert set(tracks(backend)) == {
        ("llm_input_tokens", 1000),
        ("llm_output_tokens", 1000),
    }
    assert credits(backend) == 97  # 1 credit in, 2 credits out


def test_the_customer_can_come_from_the_meter_scope(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-scope", usage=(1000, 0))))
    client = wrap_client(sync_client(api), meter, customer_id=None)

    with pytest.raises(AgentMeterError, match="no customer"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with meter.customer(CUSTOMER):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert len(api.requests) == 1
    assert credits(backend) == 99


def test_wrong_wiring_is_refused_at_wrap_time() -> None:
    meter = Meter(MemoryBackend(pricing=example_pricing()))
    client = sync_client(ScriptedAPI())

    with pytest.raises(ConfigError, match="unknown feature"):
        wrap_client(client, meter, customer_id=CUSTOMER, feature_id="tokens")
    with pytest.raises(ConfigError, match="both"):
        wrap_client(client, meter, customer_id=CUSTOMER, input_feature_id="llm_input_tokens")
    with pytest.raises(ConfigError, match="entity_id needs customer_id"):
        wrap_client(client, meter, customer_id=None, entity_id="seat_1")
    with pytest.raises(TypeError, match="OpenAI"):
        wrap_client(object(), meter, customer_id=CUSTOMER)  # type: ignore[type-var]


def test_usage_the_backend_cannot_take_now_waits_in_the_outbox_and_is_billed_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    backend.fail(method="track", times=1)
    meter = Meter(backend)
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-late", usage=(10, 10))))
    client = wrap_client(sync_client(api), meter, customer_id=CUSTOMER)

    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert completion.id == "chatcmpl-late"
    assert meter.flush(timeout=5) == 0
    assert tracks(backend) == [("llm_tokens", 20)]
    assert credits(backend) == 100 - 0.02


# -- async client ------------------------------------------------------------------------


async def test_async_completion_bills_its_total_tokens(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(chat_completion("chatcmpl-aa", usage=(1200, 630))))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert isinstance(completion, ChatCompletion)
    assert credits(backend) == 100 - 1.83


async def test_async_stream_without_include_usage_hides_the_usage_chunk(
    meter: Meter, backend: Any
) -> None:
    content, last = chunks("chatcmpl-as1", usage=(900, 100))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert isinstance(stream, AsyncStream)
    seen = [chunk async for chunk in stream]

    assert api.bodies[0]["stream_options"] == {"include_usage": True}
    assert [chunk.model_dump(exclude_unset=True) for chunk in seen] == content
    assert credits(backend) == 99


async def test_async_stream_that_asked_for_usage_keeps_it(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-as2", usage=(1500, 500))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    seen = [chunk async for chunk in stream]

    assert len(seen) == len(content) + 1
    assert seen[-1].usage is not None
    assert credits(backend) == 98


async def test_async_caller_that_stops_at_finish_reason_still_pays(
    meter: Meter, backend: Any
) -> None:
    content, last = chunks("chatcmpl-astop", usage=(800, 200))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    seen = []
    async with await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as stream:
        async for chunk in stream:
            seen.append(chunk)
            if chunk.choices[0].finish_reason:
                break

    assert len(seen) == len(content)
    assert credits(backend) == 99


async def test_async_customer_without_credit_sends_no_request(meter: Meter, backend: Any) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    api = ScriptedAPI()
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    with pytest.raises(UsageLimitExceeded):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(UsageLimitExceeded):
        await client.responses.create(model=MODEL, input="hi")

    assert api.requests == []


@pytest.mark.parametrize(
    ("status", "error"), [(401, openai.AuthenticationError), (503, openai.InternalServerError)]
)
async def test_async_openai_error_bills_nothing(status: int, error: type[Exception]) -> None:
    backend = MemoryBackend(pricing=example_pricing())
    body = {"error": {"message": "nope", "type": "server_error", "code": None}}
    api = ScriptedAPI(json_reply(body, status))
    client = wrap_client(async_client(api), Meter(backend), customer_id=CUSTOMER)

    with pytest.raises(error):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)

    assert len(api.requests) == 1
    assert tracks(backend) == []
    assert credits(backend) == 100


async def test_async_plain_response_bills_its_total_tokens(meter: Meter, backend: Any) -> None:
    api = ScriptedAPI(json_reply(response_object("resp_aa", usage=(300, 200))))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    response = await client.responses.create(model="gpt-4.1", input="Say hi")

    assert response.id == "resp_aa"
    assert credits(backend) == 99.5


async def test_async_with_raw_response_stream_is_metered(meter: Meter, backend: Any) -> None:
    content, last = chunks("chatcmpl-araw", usage=(1000, 1000))
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    client = wrap_client(async_client(api), meter, customer_id=CUSTOMER)

    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True
    )
    seen = [chunk async for chunk in raw.parse()]

    assert len(seen) == len(content)
    assert credits(backend) == 98


# -- issue 14: a stream is billed when its usage is read, or at close(), never at GC ------


def _cumulative(completion_id: str) -> list[dict[str, Any]]:
    content, _ = chunks(completion_id)
    for n, chunk in enumerate(content, start=1):
        chunk["usage"] = {"prompt_tokens": 100, "completion_tokens": n, "total_tokens": 100 + n}
    return content


def test_a_cumulative_stream_left_at_finish_reason_is_billed_at_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content = _cumulative("chatcmpl-cum-stop")
    client = wrap_client(
        sync_client(ScriptedAPI(sse_reply(sse(content)))), Meter(backend), customer_id=CUSTOMER
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices[0].finish_reason:
            break  # the stream is left open, and kept alive: no GC can bill it
    assert tracks(backend) == [("llm_tokens", 100 + len(content))]
    stream.close()
    assert len(tracks(backend)) == 1


def test_close_bills_a_stream_read_halfway_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, last = chunks("chatcmpl-close", usage=(800, 200))
    client = wrap_client(
        sync_client(ScriptedAPI(sse_reply(sse([*content, last])))),
        Meter(backend),
        customer_id=CUSTOMER,
    )
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    next(iter(stream))
    stream.close()
    assert tracks(backend) == [("llm_tokens", 1000)]
    stream.close()
    assert len(tracks(backend)) == 1


def test_the_stream_helper_bills_at_exit_when_left_early() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, last = chunks("chatcmpl-helper", usage=(800, 200))
    client = wrap_client(
        sync_client(ScriptedAPI(sse_reply(sse([*content, last])))),
        Meter(backend),
        customer_id=CUSTOMER,
    )
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
        for _event in stream:
            break
        assert backend.holds()  # only the reservation yet
    assert tracks(backend) == [("llm_tokens", 1000)]


async def test_async_close_bills_a_stream_read_halfway_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, last = chunks("chatcmpl-aclose", usage=(800, 200))
    client = wrap_client(
        async_client(ScriptedAPI(sse_reply(sse([*content, last])))),
        Meter(backend),
        customer_id=CUSTOMER,
    )
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    async for _chunk in stream:
        break
    assert backend.holds()  # only the reservation yet
    await stream.close()
    assert tracks(backend) == [("llm_tokens", 1000)]


async def test_async_stream_context_exit_bills_once() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    content, last = chunks("chatcmpl-aexit", usage=(800, 200))
    client = wrap_client(
        async_client(ScriptedAPI(sse_reply(sse([*content, last])))),
        Meter(backend),
        customer_id=CUSTOMER,
    )
    async with await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as stream:
        async for _chunk in stream:
            break
    assert tracks(backend) == [("llm_tokens", 1000)]


def test_split_token_features_need_no_total_feature() -> None:
    """Issue 14 point 9: a pricing without the default total feature is valid when split."""
    from agent_meter import Pricing  # noqa: PLC0415
    from agent_meter.pricing import Plan  # noqa: PLC0415

    pricing = Pricing(
        features={"tokens_in": "metered", "tokens_out": "metered"},
        credit_systems={"credits": {"tokens_in": 0.001, "tokens_out": 0.004}},
        plans={"free": Plan(auto_enable=True, grants={"credits": 100})},
    )
    backend = MemoryBackend(pricing=pricing)
    client = wrap_client(
        sync_client(ScriptedAPI(json_reply(chat_completion("chatcmpl-split")))),
        Meter(backend),
        customer_id=CUSTOMER,
        input_feature_id="tokens_in",
        output_feature_id="tokens_out",
    )
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert {feature for feature, _ in tracks(backend)} == {"tokens_in", "tokens_out"}
