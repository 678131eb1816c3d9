"""The billing policy every adapter shares: who pays, the call key, units, outcomes, refusals.

The adapters (:mod:`agent_meter.langchain.tools`, :mod:`~agent_meter.langchain.middleware`,
:mod:`~agent_meter.langchain.callbacks`, :mod:`agent_meter.openai.tools`,
:mod:`~agent_meter.openai.client`) only translate their framework's objects into the
questions answered here, so that a call is billed the same way whichever adapter runs it.

**Who pays** (:func:`resolve_customer`), first found wins:

1. the run's config, ``config["configurable"]["customer_id"]`` (and ``entity_id``);
2. the run's config, ``config["metadata"]["customer_id"]``;
3. the runtime context of a LangGraph agent (``context={"customer_id": ...}`` or an object
   with a ``customer_id`` attribute), where the adapter has one;
4. the innermost ``with meter.customer(...)`` block;
5. the adapter's default customer (``customer_id=...`` when it was created).

Never the model's arguments, even when a tool has a ``customer_id`` argument.

**The call key** (:func:`call_key`) names one call in idempotency keys. It is the model's
call id, scoped by where the call was made (a LangGraph thread and task, a response) and
by a digest of its arguments:

- a replay of a call that succeeded (a graph resumed, a node retried because a sibling
  failed, the same message run twice) has the same key and is not billed again;
- a retry after a failure has the same key, but the failed attempt was refunded and its
  key retired by the ledger, so the retry is billed when it succeeds;
- a different call that reuses an id (servers that number calls ``call_0`` in every
  response; another run) differs in scope or arguments and is billed as a new call.

**The outcome** (:func:`is_error_result`): an exception, an error the tool's own handler
turned into text, a ``ToolMessage`` with ``status="error"``, a ``Command`` whose messages
include one, and a failed OpenAI tool function are failures: refunded, never billed.

**The refusal** (:func:`refusal_text`): one wording everywhere, naming the feature and
what the model may do; never a customer id, never an internal cause (which is logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent_meter.context import NO_CUSTOMER_HELP, CustomerRef, current_customer
from agent_meter.errors import (
    AgentMeterError,
    BackendUnavailable,
    ConfigError,
    UsageLimitExceeded,
)
from agent_meter.keys import new_call_id

__all__ = [
    "Units",
    "call_key",
    "check_features",
    "check_units_option",
    "count_units",
    "default_customer",
    "is_error_result",
    "langgraph_scope",
    "refusal_text",
    "resolve_customer",
]

logger = logging.getLogger("agent_meter")

Units = float | Callable[[dict[str, Any]], float]
"""Units a call uses: a number, or a function of the call's validated arguments."""

_DIGEST_CHARS = 16


# -- who pays --------------------------------------------------------------------------------


def _from_section(values: object) -> CustomerRef | None:
    if (type(values) is dict or isinstance(values, Mapping)) and values.get(
        "customer_id"
    ) is not None:
        return CustomerRef.of(values["customer_id"], values.get("entity_id"))
    return None


def _from_context(context: object) -> CustomerRef | None:
    if context is None:
        return None
    if isinstance(context, Mapping):
        return _from_section(context)
    customer = getattr(context, "customer_id", None)
    if customer is None:
        return None
    return CustomerRef.of(customer, getattr(context, "entity_id", None))


def resolve_customer(
    config: Mapping[str, Any] | None = None,
    *,
    context: object = None,
    default: CustomerRef | None = None,
    help_text: str = NO_CUSTOMER_HELP,
) -> CustomerRef:
    """Who pays for a call, in the one documented order (see the module docstring).

    Args:
        config: The LangChain run's config, if there is one.
        context: A LangGraph runtime context, if the adapter has one.
        default: The adapter's default customer.
        help_text: The message of the error raised when no customer is found.

    Raises:
        AgentMeterError: No customer anywhere; the message says how to pass one.
        InvalidUsage: The customer or entity id found is malformed.
    """
    if config:
        for section in ("configurable", "metadata"):
            found = _from_section(config.get(section))
            if found is not None:
                return found
    found = _from_context(context)
    if found is not None:
        return found
    bound = current_customer()
    if bound is not None:
        return bound
    if default is not None:
        return default
    raise AgentMeterError(help_text)


def default_customer(customer_id: str | None, entity_id: str | None = None) -> CustomerRef | None:
    """Validate an adapter's ``customer_id=`` / ``entity_id=`` options.

    Raises:
        ConfigError: ``entity_id`` without ``customer_id``.
        InvalidUsage: A malformed id.
    """
    if customer_id is None:
        if entity_id is not None:
            msg = "entity_id needs customer_id (or bind both with meter.customer(...))"
            raise ConfigError(msg)
        return None
    return CustomerRef.of(customer_id, entity_id)


# -- the call key ----------------------------------------------------------------------------


def langgraph_scope(config: Mapping[str, Any] | None) -> str | None:
    """Where a LangChain call runs: its LangGraph thread and task, when it has them.

    LangGraph names each task by its checkpoint and step (``checkpoint_ns``), the same for
    a task retried or resumed and different for each step and each run; ``thread_id``
    names the conversation. A call outside a graph has no scope.
    """
    if not config:
        return None
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    thread = configurable.get("thread_id")
    task = configurable.get("checkpoint_ns") or metadata.get("checkpoint_ns")
    if (thread is None or thread == "") and (task is None or task == ""):
        return None
    return f"{'' if thread is None else str(thread)}|{'' if task is None else str(task)}"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=repr)
"""Encodes arguments the same way every time (built once: it runs on every call)."""


def _canonical(arguments: object) -> str:
    try:
        return _CANONICAL.encode(arguments)
    except (TypeError, ValueError):  # keys that are not strings, circular values
        return repr(arguments)


def call_key(call_id: str | None, arguments: object = None, *, scope: str | None = None) -> str:
    """The id that names one call in its idempotency keys (see the module docstring).

    Args:
        call_id: The model's tool call id (``tool_call_id``, ``call_id``); None for a call
            without one, which gets a fresh id (it is never taken for a replay).
        arguments: The call's arguments as the model sent them (JSON values).
        scope: Where the call was made (:func:`langgraph_scope`, a response id).

    Returns:
        ``<call_id>.<digest>``: the call id stays readable in the ledger.
    """
    if not call_id:
        return new_call_id()
    digest = hashlib.sha256(f"{scope or ''}\x00{_canonical(arguments)}".encode()).hexdigest()
    return f"{call_id}.{digest[:_DIGEST_CHARS]}"


# -- units -----------------------------------------------------------------------------------


def check_units_option(units: object, feature_id: str) -> None:
    """Refuse a ``units=`` option that is neither a non-negative number nor a function.

    Raises:
        ConfigError: The option is wrong.
    """
    if callable(units):
        return
    if isinstance(units, bool) or not isinstance(units, (int, float)) or units < 0:
        msg = f"units for {feature_id!r} must be a non-negative number or a function"
        raise ConfigError(msg)


def count_units(units: Units, arguments: Mapping[str, Any]) -> float:
    """The units of one call: ``units`` itself, or ``units(arguments)``.

    Adapters call it on *validated* arguments, after the tool's own schema accepted them;
    an exception from ``units`` propagates, and the adapter answers it as the tool answers
    invalid arguments (a validation error the model can read; nothing is billed).
    """
    if callable(units):
        return units(dict(arguments))
    return units


# -- outcomes --------------------------------------------------------------------------------


def _error_message(item: object) -> bool:
    return getattr(item, "type", None) == "tool" and getattr(item, "status", None) == "error"


def is_error_result(output: object) -> bool:
    """Whether a tool's output reports a failure, though nothing was raised.

    A ``ToolMessage`` with ``status="error"``, a list holding one, or a LangGraph
    ``Command`` whose update carries one (``{"messages": [...]}`` or a list of
    ``(channel, value)`` pairs).
    """
    if _error_message(output):
        return True
    if isinstance(output, (list, tuple)):
        return any(_error_message(item) or is_error_result(item) for item in output)
    if type(output).__name__ == "Command" and hasattr(output, "update"):
        update = output.update
        if isinstance(update, Mapping):
            messages = update.get("messages")
        elif isinstance(update, (list, tuple)):
            messages = [value for pair in update if isinstance(pair, tuple) for value in pair[1:]]
        else:
            messages = getattr(update, "messages", None)
        if messages is None:
            return False
        if not isinstance(messages, (list, tuple)):
            messages = [messages]
        return any(_error_message(item) for item in messages)
    return False


# -- refusals --------------------------------------------------------------------------------


def refusal_text(error: AgentMeterError, feature_id: str) -> str:
    """What the model reads when a call is refused: one wording for every adapter.

    A denial says what is left and what was needed (``"web_search is unavailable: 0
    credits left, 1 needed"``). A billing service that failed is refused as "temporarily
    unavailable"; its cause, and the customer id, go to the log, never to the model.
    """
    if isinstance(error, UsageLimitExceeded):
        return error.reason
    logger.warning("agent_meter: a call of %s was refused: %s", feature_id, error)
    if isinstance(error, BackendUnavailable):
        return (
            f"{feature_id} is unavailable: the billing service is unreachable, so the "
            "tool was not run and nothing was charged; try again later"
        )
    return (
        f"{feature_id} is unavailable: the billing service refused the check, so the tool "
        "was not run and nothing was charged"
    )


# -- features --------------------------------------------------------------------------------


def check_features(meter: Any, features: Mapping[str, str] | None = None, *extra: object) -> None:
    """Refuse unknown feature ids when an adapter is built, not on its first call.

    Args:
        meter: The adapter's :class:`~agent_meter.Meter`.
        features: Name (a tool, a function) to feature id.
        *extra: More feature ids; None entries are skipped.

    Raises:
        ConfigError: An id that is not a non-empty string, or unknown to the pricing.
    """
    ids = [*(features or {}).values(), *extra]
    for feature_id in ids:
        if feature_id is None:
            continue
        if not isinstance(feature_id, str) or not feature_id:
            msg = f"feature_id must be a non-empty string, not {feature_id!r}"
            raise ConfigError(msg)
        meter.feature_type(feature_id)
