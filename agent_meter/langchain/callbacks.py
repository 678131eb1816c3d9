"""Meter (and gate) the LLM tokens of a LangChain run with a callback handler.

:class:`MeteringCallbackHandler` is passed in a run's ``callbacks`` and sees every chat
model and LLM call of that run, agents included:

- before each call (``on_chat_model_start`` / ``on_llm_start``) it reserves the call's
  estimate: the prompt's tokens plus the completion limit from the invocation parameters
  (see :mod:`agent_meter.llm_billing` for ``estimate``, ``default_max_tokens``,
  ``on_denied``); a customer who cannot pay it gets
  :class:`~agent_meter.UsageLimitExceeded` and the model is never called;
- after each call (``on_llm_end``) it settles the reservation to the tokens the reply
  reports, keyed by the LLM run id, once however often the end is reported. A streamed
  call ends once, with the merged reply, so usage sent on the last chunk is billed
  exactly once; a failed call (``on_llm_error``) gives the reservation back;
- a reply that reports no usage is reported to the meter's hooks
  (:class:`~agent_meter.hooks.UnbilledTokens`, logged as a warning by default) and counted
  as unmetered in :attr:`MeteringCallbackHandler.summary`, never silently free.

It is a synchronous ``BaseCallbackHandler`` on purpose. LangChain honours ``raise_error``
for a sync handler in sync runs and in async runs (where it runs the handler in a worker
thread with the caller's context copied, so ``meter.customer(...)`` is still visible). An
``AsyncCallbackHandler`` driven by a sync run has its exceptions logged and dropped by
langchain-core (``_run_coros``), which would let a denied customer call the model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.runnables.config import var_child_runnable_config
from rich.text import Text

from agent_meter.context import NO_CUSTOMER_HELP, CustomerRef
from agent_meter.estimate import DEFAULT_MAX_TOKENS, Estimator, TokenCounter, completion_limit
from agent_meter.integration import check_features, default_customer, resolve_customer
from agent_meter.langchain.usage import usage_from_result
from agent_meter.llm_billing import LLMCall, _Unreserved, llm_billing, unmetered
from agent_meter.tables import PrintableTable
from agent_meter.tokens import TokenFeatures, TokenUsage, check_gate_estimate
from agent_meter.wording import number

if TYPE_CHECKING:
    from uuid import UUID

    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import LLMResult

    from agent_meter.meter import Meter

__all__ = ["MeteringCallbackHandler", "ModelUsage", "UsageSummary"]

UNKNOWN_MODEL = "unknown"
# Run ids already billed, kept so that a repeated on_llm_end is not counted twice in the
# summary; bounded because a long-lived handler may see millions of calls.
_REMEMBERED_RUNS = 100_000

# langchain-core logs every exception a callback raises as "Error in <handler>.<event>
# callback: ..." before re-raising it (raise_error=True). A denial by the gate is the
# answer the caller gets, not a crash: that line is left out for our handlers' denials.
_HANDLERS: set[str] = set()
_CALLBACK_ERROR = "Error in %s.%s callback: %s"


class _DenialIsNotACrash(logging.Filter):
    """Drops langchain-core's "Error in ... callback" line for a gate denial of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg == _CALLBACK_ERROR
            and isinstance(args, tuple)
            and len(args) == 3
            and args[0] in _HANDLERS
            and str(args[2]).startswith("UsageLimitExceeded(")
        )


_FILTER = _DenialIsNotACrash()


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What one model used, over every run a handler saw.

    Attributes:
        model: The model name (``"unknown"`` when neither the reply nor the call named it).
        calls: LLM calls that ended.
        input_tokens: Prompt tokens billed.
        output_tokens: Completion tokens billed.
        total_tokens: Total tokens billed.
        credits: What those tokens cost in the credit system, when the pricing is known
            and every billed feature draws from a credit system; else None.
        unmetered_calls: Calls whose reply reported no usage (billed nothing).
    """

    model: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    credits: float | None = 0.0
    unmetered_calls: int = 0


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """A snapshot of the usage a :class:`MeteringCallbackHandler` has seen, per model.

    ``str(summary)`` is a small table; :meth:`to_dict` a plain structure for JSON or logs.

    Attributes:
        models: Model name to its :class:`ModelUsage`.
        credit_system: The pool credits are counted in (``"credits"``), when known.
    """

    models: Mapping[str, ModelUsage] = field(default_factory=dict)
    credit_system: str | None = None

    @property
    def total(self) -> ModelUsage:
        """Every model added up (``model`` is ``"total"``)."""
        credits: float | None = 0.0
        for usage in self.models.values():
            credits = None if credits is None or usage.credits is None else credits + usage.credits
        return ModelUsage(
            "total",
            calls=sum(u.calls for u in self.models.values()),
            input_tokens=sum(u.input_tokens for u in self.models.values()),
            output_tokens=sum(u.output_tokens for u in self.models.values()),
            total_tokens=sum(u.total_tokens for u in self.models.values()),
            credits=credits,
            unmetered_calls=sum(u.unmetered_calls for u in self.models.values()),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"models": {name: {...}}, "total": {...}, "credit_system": ...}``."""
        return {
            "models": {name: asdict(usage) for name, usage in self.models.items()},
            "total": asdict(self.total),
            "credit_system": self.credit_system,
        }

    def table(self, title: str = "LLM tokens per model") -> PrintableTable:
        """The summary as a rich table (``print()`` shows it as text), with a total row."""
        unit = self.credit_system or "credits"
        table = PrintableTable(title=Text(title))
        table.add_column("model")
        for column in ("calls", "input", "output", "total", unit, "unmetered"):
            table.add_column(column, justify="right")
        usages = [*self.models.values(), self.total]
        for index, usage in enumerate(usages):
            credits = "?" if usage.credits is None else number(usage.credits)
            table.add_row(
                Text(usage.model),
                str(usage.calls),
                str(usage.input_tokens),
                str(usage.output_tokens),
                str(usage.total_tokens),
                credits,
                str(usage.unmetered_calls),
                style="bold" if index == len(usages) - 1 else None,
                end_section=index == len(usages) - 2,
            )
        return table

    def __str__(self) -> str:
        unit = self.credit_system or "credits"
        header = ("model", "calls", "input", "output", "total", unit, "unmetered")
        rows = [header]
        for usage in [*self.models.values(), self.total]:
            credits = "?" if usage.credits is None else f"{usage.credits:.6f}".rstrip("0")
            rows.append(
                (
                    usage.model,
                    str(usage.calls),
                    str(usage.input_tokens),
                    str(usage.output_tokens),
                    str(usage.total_tokens),
                    credits.rstrip("."),
                    str(usage.unmetered_calls),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)


@dataclass(slots=True)
class _Tally:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    credits: Decimal | None = Decimal(0)
    unmetered_calls: int = 0


@dataclass(frozen=True, slots=True)
class _Run:
    customer: CustomerRef
    model: str | None
    billing: LLMCall


class MeteringCallbackHandler(BaseCallbackHandler):
    """Meters every LLM call of the runs it is passed to, and refuses calls without credit.

    Create it with :meth:`agent_meter.Meter.callback_handler`. Thread-safe: one handler may
    serve concurrent runs (its summary adds them all up).

    Who pays is read in the order of :func:`agent_meter.integration.resolve_customer`:
    ``configurable["customer_id"]`` of the runnable the model runs in (an agent, a graph
    node, a chain: langchain-core does not copy ``configurable`` into callback metadata,
    so a bare ``model.invoke`` must pass ``metadata`` instead), the run's
    ``metadata["customer_id"]``, ``meter.customer(...)``, and last the handler's own
    ``customer_id``.

    A denial raises :class:`~agent_meter.UsageLimitExceeded` to the caller without
    langchain-core's "Error in ... callback" log line: a refusal is not a crash.

    Args:
        meter: The meter to bill through.
        feature_id: The feature that receives ``total_tokens`` (``"llm_tokens"``).
        input_feature_id: The feature that receives input tokens, to split the bill;
            set together with ``output_feature_id``.
        output_feature_id: The feature that receives output tokens.
        gate: Reserve (or check) the customer's credit before each call; False bills
            after the call only.
        estimate: How a call is estimated before it runs: None (count the prompt, add
            the completion limit), your tokenizer (a function of a text), or a number of
            tokens per call (see :mod:`agent_meter.estimate`).
        default_max_tokens: Output tokens reserved for a call that sets no
            ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``.
        on_denied: ``"raise"``: a refused call raises ``UsageLimitExceeded`` (a callback
            cannot answer for the model, so it is the only choice here).
        reserve: True reserves the estimate until the call ends; False only checks that
            the balance covers it (concurrent calls may then overspend).
        gate_estimate: The older name of a fixed ``estimate``.
        customer_id: Bill this customer when the run names none.
        entity_id: The entity of ``customer_id``.

    Raises:
        ConfigError: A feature the meter's pricing does not declare, or only one of
            ``input_feature_id`` and ``output_feature_id``.

    Example:
        >>> handler = meter.callback_handler(feature_id="llm_tokens")
        >>> agent.invoke(inputs, config={"callbacks": [handler],
        ...                              "configurable": {"customer_id": "cus_1"}})
        >>> print(handler.summary)
    """

    raise_error: bool = True
    """Billing failures and denials must stop the run, never be logged and dropped."""

    def __init__(
        self,
        meter: Meter,
        *,
        feature_id: str | None = "llm_tokens",
        input_feature_id: str | None = None,
        output_feature_id: str | None = None,
        gate: bool = True,
        estimate: Estimator | TokenCounter | float | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        on_denied: str = "raise",
        reserve: bool = True,
        gate_estimate: float | None = None,
        customer_id: str | None = None,
        entity_id: str | None = None,
    ) -> None:
        super().__init__()
        self.meter = meter
        self.features = TokenFeatures(feature_id, input_feature_id, output_feature_id)
        check_features(meter, None, *self.features.billed)  # ConfigError now, not on a call
        if type(self).__name__ not in _HANDLERS:
            _HANDLERS.add(type(self).__name__)
            logging.getLogger("langchain_core.callbacks.manager").addFilter(_FILTER)
        self.gate = gate
        if gate_estimate is not None:
            estimate = check_gate_estimate(gate_estimate)
        self.billing = llm_billing(
            meter,
            self.features,
            estimate=estimate,
            default_max_tokens=default_max_tokens,
            reserve=reserve,
            gate=gate,
            on_denied=on_denied,
            allowed_on_denied=("raise",),
        )
        self.customer = default_customer(customer_id, entity_id)
        self._rates, self._credit_system = self._credit_rates()
        self._lock = threading.Lock()
        self._runs: dict[UUID, _Run] = {}
        self._billed: OrderedDict[UUID, None] = OrderedDict()
        self._tallies: dict[str, _Tally] = {}

    def __repr__(self) -> str:
        return (
            f"MeteringCallbackHandler({self.features!r}, gate={self.gate}, "
            f"reserve={self.billing.reserve})"
        )

    def _credit_rates(self) -> tuple[dict[str, Decimal] | None, str | None]:
        """Credits per token for each billed feature, when all draw from one known pool."""
        pricing = self.meter.pricing
        if pricing is None:
            return None, None
        rates: dict[str, Decimal] = {}
        pools = set()
        for feature in self.features.billed:
            pool = pricing.pool_of(feature)
            if pool is None:
                return None, None
            pools.add(pool[0])
            rates[feature] = pool[1]
        return rates, pools.pop() if len(pools) == 1 else None

    # -- who pays ------------------------------------------------------------------------

    def _customer_of(self, metadata: Mapping[str, Any] | None) -> CustomerRef:
        # The config of the runnable the model runs in (a graph node, a chain step): the
        # only place a callback can see ``configurable`` in langchain-core 1.x.
        config = var_child_runnable_config.get() or {}
        return resolve_customer(
            {"configurable": config.get("configurable"), "metadata": metadata},
            default=self.customer,
            help_text=(
                f"{NO_CUSTOMER_HELP}, or pass metadata={{'customer_id': ...}} to a bare model "
                "call, or create the handler with customer_id=..."
            ),
        )

    # -- LangChain events ----------------------------------------------------------------

    def _start(
        self,
        run_id: UUID,
        serialized: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        prompt: object,
    ) -> None:
        customer = self._customer_of(metadata)
        params = invocation_params or {}
        limit = completion_limit(params, {"max_tokens": (metadata or {}).get("ls_max_tokens")})
        billing = self.billing.begin(
            customer, (prompt, params.get("tools")), limit, call_id=str(run_id)
        )
        run = _Run(customer, _model_of(serialized, metadata, invocation_params), billing)
        with self._lock:
            self._runs[run_id] = run

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Find who pays and reserve the call's estimate (with ``gate=True``).

        Raises:
            UsageLimitExceeded: The customer cannot pay the call's estimate.
            AgentMeterError: No customer for the run.
        """
        self._start(run_id, serialized, metadata, kwargs.get("invocation_params"), messages)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """:meth:`on_chat_model_start` for completion-style LLMs."""
        self._start(run_id, serialized, metadata, kwargs.get("invocation_params"), prompts)

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Settle the call's reservation to its tokens, once, keyed by its run id.

        Raises:
            BackendError: The usage could not be recorded.
        """
        with self._lock:
            if run_id in self._billed:
                return
            run = self._runs.get(run_id)
        if run is None:  # a run this handler did not see start: billed after, keyed by it
            customer = self._customer_of(None)
            run = _Run(
                customer, None, _Unreserved(self.meter, customer, self.features, str(run_id))
            )
        model = run.model
        usage = usage_from_result(response, model)
        # Closed once: a repeated on_llm_end, even racing this one from another thread, is
        # billed once (the reservation settles once; keys come from the run id). A reply
        # without usage is reported to the meter's hooks as not metered.
        run.billing.settle(usage, unmetered(model or UNKNOWN_MODEL))
        with self._lock:
            self._runs.pop(run_id, None)
            if run_id in self._billed:
                return
            self._billed[run_id] = None
            if len(self._billed) > _REMEMBERED_RUNS:
                self._billed.popitem(last=False)
            self._count(usage, model)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A failed call is not billed: its reservation is given back."""
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is not None:
            run.billing.release(f"the call failed: {type(error).__name__}")

    # -- the summary ---------------------------------------------------------------------

    def _count(self, usage: TokenUsage | None, model: str | None) -> None:
        name = (usage.model if usage is not None else None) or model or UNKNOWN_MODEL
        tally = self._tallies.setdefault(name, _Tally())
        tally.calls += 1
        if usage is None:
            tally.unmetered_calls += 1
            return
        tally.input_tokens += usage.input_tokens
        tally.output_tokens += usage.output_tokens
        tally.total_tokens += usage.total_tokens
        if self._rates is None or tally.credits is None:
            tally.credits = None
            return
        for feature, tokens in self.features.values(usage):
            tally.credits += self._rates[feature] * tokens

    @property
    def summary(self) -> UsageSummary:
        """The usage seen so far, per model, over every run this handler was passed to."""
        with self._lock:
            models = {
                name: ModelUsage(
                    name,
                    calls=tally.calls,
                    input_tokens=tally.input_tokens,
                    output_tokens=tally.output_tokens,
                    total_tokens=tally.total_tokens,
                    credits=None if tally.credits is None else float(tally.credits),
                    unmetered_calls=tally.unmetered_calls,
                )
                for name, tally in self._tallies.items()
            }
        return UsageSummary(models, self._credit_system)


def _model_of(
    serialized: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    invocation_params: Mapping[str, Any] | None,
) -> str | None:
    """The model a call is about to use, so that a reply without a name is still named."""
    for source, key in (
        (metadata, "ls_model_name"),
        (invocation_params, "model"),
        (invocation_params, "model_name"),
        (serialized, "name"),
    ):
        value = (source or {}).get(key)
        if isinstance(value, str) and value:
            return value
    return None
