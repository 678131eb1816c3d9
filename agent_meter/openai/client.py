"""Meter every LLM request an ``OpenAI`` / ``AsyncOpenAI`` client sends.

:func:`wrap_client` returns a proxy of the client. ``chat.completions.create`` / ``parse``
/ ``stream`` and ``responses.create`` / ``parse`` / ``stream`` (also through
``with_raw_response``) reserve the request's estimate before it leaves (the prompt's
tokens plus its ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, see
:mod:`agent_meter.llm_billing`): a customer who cannot pay it gets
:class:`~agent_meter.UsageLimitExceeded` and nothing reaches OpenAI. The reservation is
settled once to the usage the answer reports, and given back when the request fails.
Every other attribute is the client's own: return types, errors, retries and options are
unchanged.

Streams are settled when their usage arrives (a stream closed early is read to its usage
first), and released when they fail or end without usage. Each outcome is an event passed
to the meter's hooks (:mod:`agent_meter.hooks`): a stream or an answer without usage, and
tokens the meter could not record, are :class:`~agent_meter.hooks.UnbilledTokens`.

A chat stream reports usage only when asked (``stream_options={"include_usage": True}``);
when the caller did not ask, the proxy asks for it and hides the extra usage-only chunk
(``choices == []``), so the caller's loop sees exactly the chunks it would have seen. The
stream object returned is the SDK's own ``Stream`` / ``AsyncStream``, metered in place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream

from agent_meter.context import CustomerRef
from agent_meter.errors import BackendError
from agent_meter.estimate import DEFAULT_MAX_TOKENS, Estimator, TokenCounter, completion_limit
from agent_meter.hooks import UnbilledTokens
from agent_meter.integration import default_customer, resolve_customer
from agent_meter.keys import new_call_id
from agent_meter.llm_billing import NO_USAGE, LLMBilling, LLMCall, llm_billing
from agent_meter.meter import Meter
from agent_meter.openai.usage import (
    field,
    usage_from_chunk,
    usage_from_completion,
    usage_from_response,
)
from agent_meter.tokens import TokenFeatures, TokenUsage

__all__ = ["wrap_client"]

logger = logging.getLogger("agent_meter")

ClientT = TypeVar("ClientT", bound="OpenAI | AsyncOpenAI")

Found = tuple[str, TokenUsage]
"""A response id and the tokens it reports."""

# Stream events of the Responses API that carry the finished response and its usage.
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# What a request sends the model as text: chat messages, Responses input, tool schemas.
_PROMPT_PARAMS = ("messages", "instructions", "input", "tools", "functions")


def _found(obj: Any, usage: TokenUsage | None) -> Found | None:
    if usage is None:
        return None
    response_id = field(obj, "id")
    return (response_id if isinstance(response_id, str) and response_id else new_call_id(), usage)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """How one API reports usage: on a finished object, and on the items of its stream.

    Attributes:
        read: The usage of a finished object (a completion, a response).
        read_item: The usage a stream item carries, if any.
        final: Whether an item is the stream's last word on usage (billed at once).
        finishing: Whether more usage follows right after an item (read one item ahead,
            so a caller that stops at the end of the text still pays for it).
        asks_for_usage: Whether streams must request usage (``include_usage``).
    """

    read: Callable[[Any], Found | None]
    read_item: Callable[[Any], Found | None]
    final: Callable[[Any], bool]
    finishing: Callable[[Any], bool]
    asks_for_usage: bool


def _read_event(event: Any) -> Found | None:
    if field(event, "type") not in _FINAL_EVENTS:
        return None
    response = field(event, "response")
    return _found(response, usage_from_response(response))


def _usage_only(chunk: Any) -> bool:
    return not field(chunk, "choices")


def _finished_choice(chunk: Any) -> bool:
    return any(field(choice, "finish_reason") for choice in field(chunk, "choices") or ())


_CHAT = _Endpoint(
    read=lambda completion: _found(completion, usage_from_completion(completion)),
    read_item=lambda chunk: _found(chunk, usage_from_chunk(chunk)),
    # OpenAI sends usage once, on a last chunk without choices; servers that repeat a
    # cumulative count on every chunk are billed their latest count when the stream ends.
    final=_usage_only,
    finishing=_finished_choice,
    asks_for_usage=True,
)
_RESPONSES = _Endpoint(
    read=lambda response: _found(response, usage_from_response(response)),
    read_item=_read_event,
    final=lambda event: True,
    finishing=lambda event: False,
    asks_for_usage=False,
)


def _ask_for_usage(endpoint: _Endpoint, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Add ``include_usage`` to a chat stream request; say whether the caller lacked it."""
    if not endpoint.asks_for_usage or kwargs.get("stream") is not True:
        return kwargs, False
    options = kwargs.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    if options.get("include_usage") is True:
        return kwargs, False
    return {**kwargs, "stream_options": {**options, "include_usage": True}}, True


@dataclass(frozen=True, slots=True)
class _Billing:
    """Who pays and the LLM billing policy; reserves before a request, settles after."""

    policy: LLMBilling
    customer: CustomerRef | None

    def _ref(self) -> CustomerRef:
        # imported here: langchain-core is needed only when a LangChain run names the customer
        from langchain_core.runnables.config import var_child_runnable_config  # noqa: PLC0415

        return resolve_customer(var_child_runnable_config.get(), default=self.customer)

    @staticmethod
    def _request(kwargs: Mapping[str, Any]) -> tuple[object, int | None]:
        prompt = [kwargs.get(name) for name in _PROMPT_PARAMS]
        return prompt, completion_limit(kwargs)

    def begin(self, kwargs: Mapping[str, Any]) -> LLMCall:
        prompt, limit = self._request(kwargs)
        return self.policy.begin(self._ref(), prompt, limit, call_id=new_call_id())

    async def abegin(self, kwargs: Mapping[str, Any]) -> LLMCall:
        prompt, limit = self._request(kwargs)
        return await self.policy.abegin(self._ref(), prompt, limit, call_id=new_call_id())

    def settle(self, call: LLMCall, found: Found | None, reason: str = NO_USAGE) -> None:
        try:
            call.settle(None if found is None else found[1], reason)
        except BackendError as exc:
            # The answer is already paid for at OpenAI: losing it for the caller would not
            # undo that, so the failure is reported to the hooks instead of raised.
            self._lost(call, found, exc)

    async def asettle(self, call: LLMCall, found: Found | None, reason: str = NO_USAGE) -> None:
        try:
            await call.asettle(None if found is None else found[1], reason)
        except BackendError as exc:
            self._lost(call, found, exc)

    def _lost(self, call: LLMCall, found: Found | None, exc: BackendError) -> None:
        response_id, tokens = (
            (call.call_id, 0) if found is None else (found[0], found[1].total_tokens)
        )
        self.policy.meter.hooks.emit(
            UnbilledTokens(call.customer.customer_id, response_id, tokens, str(exc))
        )


_STREAM_FAILED = "the stream failed before its usage arrived"
_NO_STREAM_USAGE = "the stream ended without reporting usage"


_END = object()


class _StreamMeter:
    """The bookkeeping of one stream: which item carries usage, what to hide, what to bill."""

    def __init__(self, endpoint: _Endpoint, *, hide: bool) -> None:
        self.endpoint = endpoint
        self.hide = hide
        self.pending: Found | None = None

    def see(self, item: Any) -> tuple[bool, Found | None]:
        """Whether to pass ``item`` on, and the usage to bill now."""
        found = self.endpoint.read_item(item)
        if found is None:
            return True, None
        if not self.endpoint.final(item):
            self.pending = found
            return True, None
        self.pending = None
        return not (self.hide and _usage_only(item)), found

    def settle(self) -> Found | None:
        """The usage still to bill when the stream ends (a count repeated on every item)."""
        found, self.pending = self.pending, None
        return found


def _meter_stream(stream: Stream[Any], items: Iterator[Any]) -> None:
    """Meter the SDK's stream in place; ``close()`` (and ``with``) bills it at once.

    A stream closed before its usage arrived is read to its end first, quietly: usage
    comes last, and tokens the server produced are paid for whether or not the caller
    read them. Without this, the bill would wait for garbage collection.
    """
    stream._iterator = items
    close_response = stream.close

    def close() -> None:
        try:
            for _ in items:
                pass
        except Exception as exc:  # noqa: BLE001 - closing must not fail over the rest
            logger.warning("agent_meter: reading a closed stream to its usage failed: %s", exc)
        finally:
            cast(Any, items).close()
            close_response()

    stream.close = close  # type: ignore[method-assign]


def _ameter_stream(stream: AsyncStream[Any], items: AsyncIterator[Any]) -> None:
    """Async :func:`_meter_stream`."""
    stream._iterator = items
    close_response = stream.close

    async def close() -> None:
        try:
            async for _ in items:
                pass
        except Exception as exc:  # noqa: BLE001 - closing must not fail over the rest
            logger.warning("agent_meter: reading a closed stream to its usage failed: %s", exc)
        finally:
            await cast(Any, items).aclose()
            await close_response()

    stream.close = close  # type: ignore[method-assign]


class _ClosingManager:
    """The SDK's ``stream()`` manager, whose exit closes the metered stream under it.

    The SDK's helper closes the HTTP response directly, past the metered stream's
    ``close()``; closing that stream first bills it on exit of the ``with`` block.
    """

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._stream: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def __enter__(self) -> Any:
        self._stream = self._manager.__enter__()
        return self._stream

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            raw = getattr(self._stream, "_raw_stream", None)
            if raw is not None:
                raw.close()
        finally:
            result = self._manager.__exit__(*exc_info)
        return result

    async def __aenter__(self) -> Any:
        self._stream = await self._manager.__aenter__()
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            raw = getattr(self._stream, "_raw_stream", None)
            if raw is not None:
                await raw.close()
        finally:
            result = await self._manager.__aexit__(*exc_info)
        return result


def _metered_items(
    items: Iterator[Any], billing: _Billing, call: LLMCall, meter: _StreamMeter
) -> Iterator[Any]:
    failed = True
    try:
        for item in items:
            batch = [item]
            ended = False
            if meter.endpoint.finishing(item):
                # The usage chunk follows the last text chunk at once: read it before the
                # caller, who may stop at finish_reason, gets the chance to walk away.
                ahead = next(items, _END)
                ended = ahead is _END
                if not ended:
                    batch.append(ahead)
            kept = []
            for each in batch:  # settle on the whole batch before the caller sees any of it
                keep, found = meter.see(each)
                if found is not None:
                    billing.settle(call, found)  # once: a later settle does nothing
                if keep:
                    kept.append(each)
            if ended and (found := meter.settle()) is not None:
                billing.settle(call, found)  # the last count of a server that repeats it
            for each in kept:
                yield each
        failed = False
    finally:
        # Settled already when the usage arrived; else the latest count, else released.
        if (found := meter.settle()) is not None:
            billing.settle(call, found)
        elif failed:
            call.release(_STREAM_FAILED)
        else:
            billing.settle(call, None, _NO_STREAM_USAGE)  # not metered: reported


async def _ametered_items(
    items: AsyncIterator[Any], billing: _Billing, call: LLMCall, meter: _StreamMeter
) -> AsyncIterator[Any]:
    failed = True
    try:
        async for item in items:
            batch = [item]
            ended = False
            if meter.endpoint.finishing(item):
                ahead = await anext(items, _END)
                ended = ahead is _END
                if not ended:
                    batch.append(ahead)
            kept = []
            for each in batch:  # settle on the whole batch before the caller sees any of it
                keep, found = meter.see(each)
                if found is not None:
                    await billing.asettle(call, found)
                if keep:
                    kept.append(each)
            if ended and (found := meter.settle()) is not None:
                await billing.asettle(call, found)
            for each in kept:
                yield each
        failed = False
    finally:
        if (found := meter.settle()) is not None:
            await billing.asettle(call, found)
        elif failed:
            await call.arelease(_STREAM_FAILED)
        else:
            await billing.asettle(call, None, _NO_STREAM_USAGE)


class _Proxy:
    """Delegates every attribute it does not define to the object it wraps."""

    def __init__(self, inner: Any, billing: _Billing) -> None:
        self._inner = inner
        self._billing = billing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<metered {self._inner!r}>"


class _SyncEndpoint(_Proxy):
    """``chat.completions`` or ``responses`` of a sync client, metered."""

    def __init__(self, inner: Any, billing: _Billing, endpoint: _Endpoint, *, raw: bool) -> None:
        super().__init__(inner, billing)
        self._endpoint = endpoint
        self._raw = raw

    def _call(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        call = self._billing.begin(kwargs)
        kwargs, hide = _ask_for_usage(self._endpoint, kwargs)
        try:
            result = method(**kwargs)
            # A raw response parses once and caches: the caller's .parse() gets this object.
            value = result.parse() if self._raw else result
        except BaseException as exc:
            call.release(f"the request failed: {type(exc).__name__}")
            raise
        if isinstance(value, Stream):
            _meter_stream(
                value,
                _metered_items(
                    value._iterator, self._billing, call, _StreamMeter(self._endpoint, hide=hide)
                ),
            )
        else:
            self._billing.settle(call, self._endpoint.read(value))
        return result

    def create(self, **kwargs: Any) -> Any:
        """The client's ``create``, gated before and billed after."""
        return self._call(self._inner.create, kwargs)

    def parse(self, **kwargs: Any) -> Any:
        """The client's ``parse``, gated before and billed after."""
        return self._call(self._inner.parse, kwargs)

    def stream(self, **kwargs: Any) -> Any:
        """The client's ``stream`` helper, over the metered :meth:`create`."""
        if self._raw:
            return self._inner.stream(**kwargs)
        # The SDK's helper calls resource.create: handing it this proxy meters the stream.
        return _ClosingManager(type(self._inner).stream(cast(Any, self), **kwargs))

    @property
    def with_raw_response(self) -> _SyncEndpoint:
        """The raw-response variant, metered too."""
        return _SyncEndpoint(self._inner.with_raw_response, self._billing, self._endpoint, raw=True)


class _AsyncEndpoint(_Proxy):
    """``chat.completions`` or ``responses`` of an async client, metered."""

    def __init__(self, inner: Any, billing: _Billing, endpoint: _Endpoint, *, raw: bool) -> None:
        super().__init__(inner, billing)
        self._endpoint = endpoint
        self._raw = raw

    async def _call(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        call = await self._billing.abegin(kwargs)
        kwargs, hide = _ask_for_usage(self._endpoint, kwargs)
        try:
            result = await method(**kwargs)
            value = result.parse() if self._raw else result
        except BaseException as exc:
            await call.arelease(f"the request failed: {type(exc).__name__}")
            raise
        if isinstance(value, AsyncStream):
            _ameter_stream(
                value,
                _ametered_items(
                    value._iterator, self._billing, call, _StreamMeter(self._endpoint, hide=hide)
                ),
            )
        else:
            await self._billing.asettle(call, self._endpoint.read(value))
        return result

    async def create(self, **kwargs: Any) -> Any:
        """The client's ``create``, gated before and billed after."""
        return await self._call(self._inner.create, kwargs)

    async def parse(self, **kwargs: Any) -> Any:
        """The client's ``parse``, gated before and billed after."""
        return await self._call(self._inner.parse, kwargs)

    def stream(self, **kwargs: Any) -> Any:
        """The client's ``stream`` helper, over the metered :meth:`create`."""
        if self._raw:
            return self._inner.stream(**kwargs)
        return _ClosingManager(type(self._inner).stream(cast(Any, self), **kwargs))

    @property
    def with_raw_response(self) -> _AsyncEndpoint:
        """The raw-response variant, metered too."""
        return _AsyncEndpoint(
            self._inner.with_raw_response, self._billing, self._endpoint, raw=True
        )


def _endpoint(
    inner: Any, billing: _Billing, endpoint: _Endpoint, *, raw: bool, is_async: bool
) -> Any:
    kind = _AsyncEndpoint if is_async else _SyncEndpoint
    return kind(inner, billing, endpoint, raw=raw)


class _Chat(_Proxy):
    """``client.chat`` with metered ``completions``."""

    def __init__(self, inner: Any, billing: _Billing, *, raw: bool, is_async: bool) -> None:
        super().__init__(inner, billing)
        self._raw = raw
        self._async = is_async

    @property
    def completions(self) -> Any:
        """Metered ``chat.completions``."""
        return _endpoint(
            self._inner.completions, self._billing, _CHAT, raw=self._raw, is_async=self._async
        )

    @property
    def with_raw_response(self) -> _Chat:
        """``chat.with_raw_response``, metered too."""
        return _Chat(self._inner.with_raw_response, self._billing, raw=True, is_async=self._async)


class _Client(_Proxy):
    """A client (or its ``with_raw_response`` view) whose LLM endpoints are metered."""

    def __init__(self, inner: Any, billing: _Billing, *, raw: bool, is_async: bool) -> None:
        super().__init__(inner, billing)
        self._raw = raw
        self._async = is_async

    @property
    def chat(self) -> _Chat:
        """Metered ``client.chat``."""
        return _Chat(self._inner.chat, self._billing, raw=self._raw, is_async=self._async)

    @property
    def responses(self) -> Any:
        """Metered ``client.responses``."""
        return _endpoint(
            self._inner.responses, self._billing, _RESPONSES, raw=self._raw, is_async=self._async
        )

    @property
    def with_raw_response(self) -> _Client:
        """``client.with_raw_response``, metered too."""
        return _Client(self._inner.with_raw_response, self._billing, raw=True, is_async=self._async)

    def with_options(self, **options: Any) -> Any:
        """The client's ``with_options``, still metered."""
        return _Client(
            self._inner.with_options(**options), self._billing, raw=self._raw, is_async=self._async
        )

    def copy(self, **options: Any) -> Any:
        """The client's ``copy``, still metered."""
        return _Client(
            self._inner.copy(**options), self._billing, raw=self._raw, is_async=self._async
        )


def wrap_client(
    client: ClientT,
    meter: Meter,
    *,
    customer_id: str | None,
    feature_id: str | None = "llm_tokens",
    input_feature_id: str | None = None,
    output_feature_id: str | None = None,
    entity_id: str | None = None,
    estimate: Estimator | TokenCounter | float | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    on_denied: str = "raise",
    reserve: bool = True,
) -> ClientT:
    """Wrap an ``OpenAI`` or ``AsyncOpenAI`` client so its LLM requests are metered.

    Every ``chat.completions.create`` / ``parse`` / ``stream`` and ``responses.create`` /
    ``parse`` / ``stream`` is gated before the request is sent and its tokens billed after,
    keyed by the response id (a repeat is never billed twice). Streams are billed once,
    when their usage arrives at the end.

    Args:
        client: The client to wrap; it is not modified and keeps working unmetered.
        meter: The meter that gates and bills.
        customer_id: Who pays by default: a LangChain run or a ``meter.customer(...)``
            block around a request names its own customer first (one wrapped client shared
            by a server's requests), in the order of
            :func:`agent_meter.integration.resolve_customer`. None: such a block is needed.
        feature_id: The feature billed ``total_tokens``.
        input_feature_id: With ``output_feature_id``: bill input and output tokens to
            features of their own instead.
        output_feature_id: See ``input_feature_id``.
        entity_id: Sub-scope of the customer.
        estimate: How a request is estimated before it is sent: None (count the
            prompt, add the completion limit), your tokenizer (a function of a text), or
            a number of tokens per request.
        default_max_tokens: Output tokens reserved for a request that sets no limit.
        on_denied: ``"raise"``: a refused request raises ``UsageLimitExceeded`` and is
            not sent (the only choice here: the proxy does not invent answers).
        reserve: True reserves the estimate until the answer; False only checks that
            the balance covers it.

    Returns:
        A proxy typed as the client: ``chat``, ``responses``, ``with_raw_response``,
        ``with_options`` and ``copy`` are metered; every other attribute is the client's.

    Raises:
        TypeError: ``client`` is not an ``OpenAI`` or ``AsyncOpenAI`` client.
        ConfigError: A feature is unknown to the meter's pricing, only one of
            ``input_feature_id`` / ``output_feature_id`` is set, or ``entity_id`` comes
            without ``customer_id``.
        UsageLimitExceeded: From the wrapped methods: the customer has no credit left; the
            request was not sent.

    Example:
        >>> client = wrap_client(OpenAI(), meter, customer_id="cus_1")
        >>> client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    """
    if isinstance(client, AsyncOpenAI):
        is_async = True
    elif isinstance(client, OpenAI):
        is_async = False
    else:
        msg = f"wrap_client needs an openai.OpenAI or openai.AsyncOpenAI client, not {client!r}"
        raise TypeError(msg)
    features = TokenFeatures(total=feature_id, input=input_feature_id, output=output_feature_id)
    policy = llm_billing(  # checks the billed features: a split bill never uses the total
        meter,
        features,
        estimate=estimate,
        default_max_tokens=default_max_tokens,
        reserve=reserve,
        on_denied=on_denied,
        allowed_on_denied=("raise",),
    )
    customer = default_customer(customer_id, entity_id)
    billing = _Billing(policy, customer)
    return cast(ClientT, _Client(client, billing, raw=False, is_async=is_async))
