"""LangChain tool wrappers: every tool call checked, only successes billed.

:func:`wrap_tool` turns any LangChain tool into a :class:`MeteredTool` that the model sees
exactly as before (name, description, argument schema, ``return_direct``,
``response_format``, tags, metadata) and that runs each call inside
:meth:`Meter.guard <agent_meter.Meter.guard>`:

- **who pays** comes from the run's config (``config["configurable"]["customer_id"]`` and
  optional ``["entity_id"]``) or from an enclosing ``meter.customer(...)`` block, never
  from the tool's arguments, even when the tool has a ``customer_id`` argument;
- **the idempotency key** comes from the model's ``tool_call_id`` (a generated id when the
  call has none);
- **success** means the tool returned normally. An exception, a ``ToolException`` (also
  one the tool's own ``handle_tool_error`` turned into text), a handled validation error
  and a ``ToolMessage`` with ``status="error"`` are failures: refunded, never billed. The
  tool's own error handling behaves exactly as it did before wrapping;
- **a denial** does not run the tool: invoked with a tool call, the wrapper answers with an
  error ``ToolMessage`` the model can read ("web_search is unavailable: 0 credits left, 1
  needed"); invoked with plain arguments (or with ``on_denied="raise"``) it raises
  :class:`~agent_meter.errors.UsageLimitExceeded`. A check the billing service could not
  answer is refused the same way, with a message that says so.

:func:`metered` does the same for plain Python functions, sync or async.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, cast

from langchain_core.callbacks import Callbacks
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, var_child_runnable_config
from langchain_core.tools import BaseTool, Tool
from langchain_core.tools.base import ArgsSchema
from langchain_core.utils.pydantic import TypeBaseModel
from pydantic import PrivateAttr
from pydantic import ValidationError as ValidationErrorV2
from pydantic.v1 import ValidationError as ValidationErrorV1
from pydantic_core import InitErrorDetails, PydanticCustomError

from agent_meter.context import CustomerRef
from agent_meter.engine import FAIL_POLICIES, STRATEGIES, FailPolicy, Strategy
from agent_meter.errors import AgentMeterError, BackendError, ConfigError, UsageLimitExceeded
from agent_meter.integration import (
    Units,
    call_key,
    check_features,
    check_units_option,
    count_units,
    default_customer,
    is_error_result,
    langgraph_scope,
    refusal_text,
    resolve_customer,
)
from agent_meter.meter import GuardedCall, Meter

__all__ = ["MeteredTool", "OnDenied", "Units", "metered", "wrap_tool", "wrap_tools"]

logger = logging.getLogger("agent_meter")

OnDenied = Literal["message", "raise"]
"""What a refused tool call does: answer with an error ``ToolMessage`` the model can read
(when it was invoked with a tool call), or raise."""

ON_DENIED: tuple[str, ...] = ("message", "raise")

F = TypeVar("F", bound=Callable[..., Any])


class _Outcome:
    """What the wrapped tool's own error handlers saw during one call."""

    __slots__ = ("handled_error",)

    def __init__(self) -> None:
        self.handled_error = False


# One outcome per call: contextvars are per thread and per asyncio task, so parallel calls
# of the same tool (LangGraph's ToolNode) never see each other's errors.
_OUTCOME: ContextVar[_Outcome | None] = ContextVar("agent_meter_tool_outcome", default=None)


class _RecordingHandler:
    """Stands in for a tool's ``handle_tool_error`` / ``handle_validation_error``.

    LangChain turns a handled error into ordinary-looking output (plain text when the
    tool was invoked without a tool call), so the wrapper cannot tell it from a success
    afterwards. This handler notes the error for the current call, then produces exactly
    the content the tool's own setting would have produced.
    """

    __slots__ = ("flag", "kind")

    def __init__(self, flag: bool | str | Callable[[Any], Any], kind: str) -> None:
        self.flag = flag
        self.kind = kind

    def __call__(self, error: Exception) -> object:
        outcome = _OUTCOME.get()
        if outcome is not None:
            outcome.handled_error = True
        # Mirrors langchain_core.tools.base._handle_tool_error / _handle_validation_error.
        if isinstance(self.flag, bool):
            if self.kind == "validation":
                return "Tool input validation error"
            return error.args[0] if error.args else "Tool execution error"
        if isinstance(self.flag, str):
            return self.flag
        return self.flag(error)

    def __repr__(self) -> str:
        return repr(self.flag)


def _recording_runner(
    tool: BaseTool,
    handle_tool_error: bool | str | Callable[..., Any] | None,
    handle_validation_error: bool | str | Callable[..., Any] | None,
) -> BaseTool:
    """A shallow copy of ``tool`` that runs with the wrapper's error handlers.

    The handlers are the wrapper's current settings (they may be changed after wrapping),
    wrapped so that they also report the error to the wrapper.
    """
    update: dict[str, Any] = {
        "handle_tool_error": _RecordingHandler(handle_tool_error, "tool")
        if handle_tool_error
        else handle_tool_error,
        "handle_validation_error": _RecordingHandler(handle_validation_error, "validation")
        if handle_validation_error
        else handle_validation_error,
    }
    # Without handlers an error propagates as an exception, which the guard already sees.
    return cast("BaseTool", tool.model_copy(update=update))


def _units_error(tool: str, arguments: object, error: Exception) -> ValidationErrorV2:
    """A units function that failed on the arguments, as a validation error of the tool."""
    return ValidationErrorV2.from_exception_data(
        tool,
        [
            InitErrorDetails(
                type=PydanticCustomError(
                    "units",
                    "the arguments do not say how many units this call uses: {cause}",
                    {"cause": f"{type(error).__name__}: {error}"},
                ),
                # LangGraph's ToolNode shows the model only errors located at an argument
                loc=(
                    next(iter(arguments), "arguments") if isinstance(arguments, dict) else "input",
                ),
                input=arguments,
            )
        ],
    )


def _bill_actual(
    call: GuardedCall, units_from_result: Callable[[Any], float], output: object, name: str
) -> None:
    """Bill the real count of a call that succeeded."""
    try:
        call.bill(units_from_result(output))
    except Exception:
        # The work succeeded: losing its result over a counting bug would be worse than
        # billing the estimate that was reserved for it.
        logger.exception(
            "agent_meter: units_from_result of %s failed; billing the estimate %s",
            name,
            call.call.units,
        )


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What a metered tool prepares once, not on every call."""

    runner: BaseTool
    """The copy of the wrapped tool that reports handled errors (see _recording_runner)."""
    handlers: tuple[object, object]
    """The error handlers it was built with."""
    model_fields: frozenset[str]
    """The names of the arguments the model writes."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one call of a metered tool does, decided before it runs."""

    customer: CustomerRef
    units: float
    key: str
    unguarded: bool = False
    invalid: ValidationErrorV2 | None = None


class MeteredTool(BaseTool):
    """A LangChain tool whose every call is checked and whose successes alone are billed.

    Built by :func:`wrap_tool` (or ``meter.wrap_tool``); the model sees the wrapped tool
    unchanged. Invoke it like any tool: ``invoke``/``ainvoke`` (with a tool call or plain
    arguments), ``run``/``arun``, in ``bind_tools``, LangGraph's ``ToolNode`` or
    ``langchain.agents.create_agent``.

    Attributes:
        tool: The wrapped tool (configure it before wrapping: the wrapper keeps a copy of
            its error handlers).
        meter: The meter that guards each call.
        feature_id: The feature each call uses.
        units: Units per call: a number, or a function of the call's arguments.
        units_from_result: When set, ``units`` is an estimate reserved up front and this
            function of the tool's output (a ``ToolMessage`` when invoked with a tool call,
            else the content) gives the real count, billed after success.
        on_denied: ``"message"`` answers a refused tool call with an error ToolMessage;
            ``"raise"`` raises. A call with plain arguments always raises.
        strategy: Overrides the meter's strategy for this tool.
        on_backend_error: Overrides the meter's fail policy for this tool.
    """

    tool: BaseTool
    meter: Meter
    feature_id: str
    units: Units = 1
    units_from_result: Callable[[Any], float] | None = None
    on_denied: OnDenied = "message"
    strategy: Strategy | None = None
    on_backend_error: FailPolicy | None = None
    func: Callable[..., Any] | None = None
    """The wrapped tool's function, if any: LangGraph's ToolNode reads its annotations to
    find injected arguments (``ToolRuntime``, ``InjectedState``). Calling it bypasses the
    meter."""
    coroutine: Callable[..., Awaitable[Any]] | None = None
    """The wrapped tool's coroutine, if any (see :attr:`func`)."""

    customer: CustomerRef | None = None
    """Who pays when the run names nobody (see :func:`agent_meter.integration.
    resolve_customer` for the order)."""

    # one private attribute, read once per call: pydantic finds private ones slowly
    _prepared: _Prepared = PrivateAttr()

    def model_post_init(self, context: object, /) -> None:
        """Prepare the copy of the wrapped tool that reports handled errors."""
        super().model_post_init(context)
        schema = self.tool.tool_call_schema
        if isinstance(schema, dict):
            names: Iterable[str] = (schema.get("properties") or {}).keys()
        else:  # a pydantic model, v2 (model_fields) or v1 (__fields__)
            names = getattr(schema, "model_fields", None) or getattr(schema, "__fields__", {})
        self._prepared = self._prepare(frozenset(names))

    def _prepare(self, model_fields: frozenset[str]) -> _Prepared:
        handlers = (self.handle_tool_error, self.handle_validation_error)
        return _Prepared(_recording_runner(self.tool, *handlers), handlers, model_fields)

    def _current(self) -> _Prepared:
        """What this tool prepared, rebuilt when error handlers were set after wrapping."""
        # read where pydantic keeps it: ``self._prepared`` finds it only after a failed
        # lookup, which costs microseconds on every call
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        prepared: _Prepared = private["_prepared"]
        handlers = prepared.handlers
        if handlers[0] is not self.handle_tool_error or (
            handlers[1] is not self.handle_validation_error
        ):
            prepared = self._prepared = self._prepare(prepared.model_fields)
        return prepared

    # -- what the model and the frameworks see: the wrapped tool's view ------------------

    @property
    def tool_call_schema(self) -> ArgsSchema:
        """The wrapped tool's schema for tool calls (what ``bind_tools`` sends)."""
        return self.tool.tool_call_schema

    @property
    def args(self) -> dict[str, Any]:
        """The wrapped tool's arguments."""
        return self.tool.args

    def get_input_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        """The wrapped tool's input schema (injected arguments included)."""
        return self.tool.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> type[Any]:
        """The wrapped tool's output schema."""
        return self.tool.get_output_schema(config)

    # -- running ------------------------------------------------------------------------

    def _run(self, *args: object, **kwargs: object) -> NoReturn:
        # BaseTool requires _run; every entry point (invoke, run, ainvoke, arun, batch,
        # stream) goes through run()/arun() below, which guard the call.
        msg = "MeteredTool runs through invoke(), ainvoke(), run() or arun()"
        raise NotImplementedError(msg)

    def _model_args(
        self, tool_input: str | dict[str, Any], model_fields: frozenset[str]
    ) -> dict[str, Any]:
        """The arguments the model wrote (injected ones such as a runtime left out)."""
        if isinstance(tool_input, str):
            first = next(iter(self.tool.args), "input")
            return {first: tool_input}
        return {key: value for key, value in tool_input.items() if key in model_fields}

    def _plan(
        self,
        prepared: _Prepared,
        tool_input: str | dict[str, Any],
        config: RunnableConfig | None,
        tool_call_id: str | None,
    ) -> _Plan:
        """Who pays, how many units, under which key; or why the call is not guarded."""
        # invoke() hands run() an ensured config; a direct run() may carry none, and then
        # the enclosing LangChain run's config (a context variable) is the trusted source.
        config = config if config is not None else ensure_config()
        ref = resolve_customer(config, default=self.customer)
        units = self.units
        if callable(units):
            try:
                validated = prepared.runner._parse_input(tool_input, tool_call_id)
            except (ValidationErrorV2, ValidationErrorV1):
                # Invalid arguments: the tool refuses them before its function runs, the
                # same way unguarded, with the error (or handled text) the model expects.
                return _Plan(ref, 0.0, "", unguarded=True)
            try:
                units = count_units(units, self._model_args(validated, prepared.model_fields))
            except Exception as error:  # noqa: BLE001 - any failure: the arguments' fault
                return _Plan(ref, 0.0, "", invalid=_units_error(self.name, validated, error))
        arguments = self._model_args(tool_input, prepared.model_fields)
        key = call_key(tool_call_id, arguments, scope=langgraph_scope(config))
        return _Plan(ref, units, key)

    def _invalid(self, error: ValidationErrorV2, tool_call_id: str | None) -> Any:
        """Answer a call whose units could not be counted, as the tool answers bad input."""
        flag = self.handle_validation_error
        if not flag:
            raise error
        content = cast("str", _RecordingHandler(flag, "validation")(error))
        if tool_call_id is None:
            return content
        return ToolMessage(content, tool_call_id=tool_call_id, name=self.name, status="error")

    def _judge(self, call: GuardedCall, output: object, outcome: _Outcome) -> None:
        """Tell the guard how the call went; runs inside it, before it settles."""
        if outcome.handled_error or is_error_result(output):
            call.fail("the tool reported an error")
            return
        if self.units_from_result is not None:
            _bill_actual(call, self.units_from_result, output, self.name)

    def _refused(self, error: AgentMeterError, tool_call_id: str | None) -> ToolMessage:
        if tool_call_id is None or self.on_denied == "raise":
            raise error
        return ToolMessage(
            refusal_text(error, self.feature_id),
            tool_call_id=tool_call_id,
            name=self.name,
            status="error",
        )

    def run(
        self,
        tool_input: str | dict[str, Any],
        verbose: bool | None = None,
        start_color: str | None = "green",
        color: str | None = "green",
        callbacks: Callbacks = None,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        run_name: str | None = None,
        run_id: uuid.UUID | None = None,
        config: RunnableConfig | None = None,
        tool_call_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the wrapped tool inside the guard (see the class docstring)."""
        prepared = self._current()
        runner = prepared.runner
        plan = self._plan(prepared, tool_input, config, tool_call_id)
        if plan.invalid is not None:
            return self._invalid(plan.invalid, tool_call_id)

        def go() -> Any:
            return runner.run(
                tool_input,
                verbose,
                start_color,
                color,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                config=config,
                tool_call_id=tool_call_id,
                **kwargs,
            )

        if plan.unguarded:
            return go()
        guard = self.meter.guard(
            plan.customer.customer_id,
            self.feature_id,
            plan.units,
            call_id=plan.key,
            entity_id=plan.customer.entity_id,
            strategy=self.strategy,
            on_backend_error=self.on_backend_error,
        )
        outcome = _Outcome()
        token = _OUTCOME.set(outcome)
        entered = False
        try:
            with guard as call:
                entered = True
                output = go()
                self._judge(call, output, outcome)
        except (UsageLimitExceeded, BackendError) as error:
            if entered:  # raised by the tool itself (a nested metered call): not ours
                raise
            return self._refused(error, tool_call_id)
        finally:
            _OUTCOME.reset(token)
        return output

    async def arun(
        self,
        tool_input: str | dict[str, Any],
        verbose: bool | None = None,
        start_color: str | None = "green",
        color: str | None = "green",
        callbacks: Callbacks = None,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        run_name: str | None = None,
        run_id: uuid.UUID | None = None,
        config: RunnableConfig | None = None,
        tool_call_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Async :meth:`run`."""
        prepared = self._current()
        runner = prepared.runner
        plan = self._plan(prepared, tool_input, config, tool_call_id)
        if plan.invalid is not None:
            return self._invalid(plan.invalid, tool_call_id)

        async def go() -> Any:
            return await runner.arun(
                tool_input,
                verbose,
                start_color,
                color,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                config=config,
                tool_call_id=tool_call_id,
                **kwargs,
            )

        if plan.unguarded:
            return await go()
        guard = self.meter.aguard(
            plan.customer.customer_id,
            self.feature_id,
            plan.units,
            call_id=plan.key,
            entity_id=plan.customer.entity_id,
            strategy=self.strategy,
            on_backend_error=self.on_backend_error,
        )
        outcome = _Outcome()
        token = _OUTCOME.set(outcome)
        entered = False
        try:
            async with guard as call:
                entered = True
                output = await go()
                self._judge(call, output, outcome)
        except (UsageLimitExceeded, BackendError) as error:
            if entered:
                raise
            return self._refused(error, tool_call_id)
        finally:
            _OUTCOME.reset(token)
        return output


class MeteredSimpleTool(MeteredTool, Tool):
    """A :class:`MeteredTool` around a single-input :class:`~langchain_core.tools.Tool`.

    It stays a ``Tool`` so that code which treats simple tools specially (OpenAI's
    function format, custom tools) sees the same tool as before wrapping.
    """


def _check_options(
    meter: Meter,
    feature_id: str,
    *,
    units: object,
    on_denied: str,
    strategy: str | None,
    on_backend_error: str | None,
    units_from_result: object,
) -> None:
    """Refuse a wrong wiring when wrapping, not when the agent first calls the tool."""
    check_features(meter, None, feature_id)
    check_units_option(units, feature_id)
    if on_denied not in ON_DENIED:
        msg = f"on_denied must be one of {ON_DENIED}, not {on_denied!r}"
        raise ConfigError(msg)
    if strategy is not None and strategy not in STRATEGIES:
        msg = f"strategy must be one of {STRATEGIES}, not {strategy!r}"
        raise ConfigError(msg)
    if on_backend_error is not None and on_backend_error not in FAIL_POLICIES:
        msg = f"on_backend_error must be one of {FAIL_POLICIES}, not {on_backend_error!r}"
        raise ConfigError(msg)
    if units_from_result is not None and not callable(units_from_result):
        msg = f"units_from_result for {feature_id!r} must be callable"
        raise ConfigError(msg)


def wrap_tool(
    meter: Meter,
    tool: BaseTool,
    feature_id: str,
    units: Units = 1,
    *,
    units_from_result: Callable[[Any], float] | None = None,
    on_denied: OnDenied = "message",
    strategy: Strategy | None = None,
    on_backend_error: FailPolicy | None = None,
    customer_id: str | None = None,
    entity_id: str | None = None,
) -> MeteredTool:
    """Wrap a LangChain tool so that every call is checked and only successes are billed.

    Args:
        meter: The meter that guards each call.
        tool: Any LangChain tool (``@tool``, ``StructuredTool``, a ``BaseTool`` subclass).
            Configure it before wrapping.
        feature_id: The feature each call uses (a ``boolean`` feature is only gated).
        units: Units per call, or a function of the call's arguments
            (``units=lambda args: len(args["urls"])``).
        units_from_result: A function of the tool's output giving the real count; then
            ``units`` is the estimate reserved up front and the difference is tracked or
            refunded after success.
        on_denied: ``"message"`` (an error ToolMessage for a refused tool call) or
            ``"raise"`` (:class:`UsageLimitExceeded`, or :class:`BackendError` when the
            billing service could not answer).
        strategy: Overrides the meter's strategy for this tool.
        on_backend_error: Overrides the meter's fail policy for this tool.
        customer_id: Who pays when the run names nobody (the last resort of
            :func:`agent_meter.integration.resolve_customer`).
        entity_id: The entity of ``customer_id``.

    Returns:
        A :class:`MeteredTool` the model sees exactly as it saw ``tool``.

    Raises:
        ConfigError: An unknown feature or option, or a tool already metered.

    Example:
        >>> search = meter.wrap_tool(search, "web_search")
        >>> search.invoke(
        ...     {"type": "tool_call", "id": "call_1", "name": "search", "args": {"q": "x"}},
        ...     config={"configurable": {"customer_id": "cus_1"}},
        ... )
    """
    if not isinstance(tool, BaseTool):
        msg = f"wrap_tool takes a LangChain BaseTool, not {type(tool).__name__}"
        raise ConfigError(msg)
    if isinstance(tool, MeteredTool):
        msg = f"tool {tool.name!r} is already metered (feature {tool.feature_id!r})"
        raise ConfigError(msg)
    _check_options(
        meter,
        feature_id,
        units=units,
        on_denied=on_denied,
        strategy=strategy,
        on_backend_error=on_backend_error,
        units_from_result=units_from_result,
    )
    cls = MeteredSimpleTool if isinstance(tool, Tool) else MeteredTool
    return cls(
        tool=tool,
        meter=meter,
        feature_id=feature_id,
        units=units,
        units_from_result=units_from_result,
        on_denied=on_denied,
        strategy=strategy,
        on_backend_error=on_backend_error,
        customer=default_customer(customer_id, entity_id),
        func=getattr(tool, "func", None),
        coroutine=getattr(tool, "coroutine", None),
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        tags=tool.tags,
        metadata=tool.metadata,
        extras=tool.extras,
        handle_tool_error=tool.handle_tool_error,
        handle_validation_error=tool.handle_validation_error,
    )


def wrap_tools(
    meter: Meter,
    tools: Sequence[BaseTool],
    features: Mapping[str, str],
    *,
    units: Units = 1,
    units_from_result: Callable[[Any], float] | None = None,
    on_denied: OnDenied = "message",
    strategy: Strategy | None = None,
    on_backend_error: FailPolicy | None = None,
    customer_id: str | None = None,
    entity_id: str | None = None,
) -> list[MeteredTool]:
    """Wrap several tools; ``features`` maps every tool name to its feature.

    Args:
        meter: The meter that guards each call.
        tools: The agent's tools.
        features: Tool name to feature id, for every tool (names not in ``tools`` are
            ignored, so one map can serve several agents).
        units: Units per call of every tool (see :func:`wrap_tool`).
        units_from_result: The real count from a tool's result (see :func:`wrap_tool`).
        on_denied: What a refused call does (see :func:`wrap_tool`).
        strategy: Overrides the meter's strategy.
        on_backend_error: Overrides the meter's fail policy.
        customer_id: Who pays when the run names nobody (see :func:`wrap_tool`).
        entity_id: The entity of ``customer_id``.

    Raises:
        ConfigError: A tool missing from ``features`` (an unmetered tool would be free),
            two tools with one name, or an unknown feature.
    """
    names = [tool.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        msg = f"several tools are named {', '.join(map(repr, duplicates))}"
        raise ConfigError(msg)
    missing = [name for name in names if name not in features]
    if missing:
        msg = (
            f"no feature for tool(s) {', '.join(map(repr, missing))}: add them to "
            "features={tool_name: feature_id} (a free tool need not be wrapped)"
        )
        raise ConfigError(msg)
    return [
        wrap_tool(
            meter,
            tool,
            features[tool.name],
            units,
            units_from_result=units_from_result,
            on_denied=on_denied,
            strategy=strategy,
            on_backend_error=on_backend_error,
            customer_id=customer_id,
            entity_id=entity_id,
        )
        for tool in tools
    ]


NO_CUSTOMER_FOR_FUNCTION = (
    "no customer for {feature}: call it inside `with meter.customer('cus_...'):` or "
    "inside a LangChain run whose config has {{'configurable': {{'customer_id': ...}}}}, "
    "or pass customer_id=... to metered()"
)


def _function_customer(feature_id: str, default: CustomerRef | None) -> CustomerRef:
    return resolve_customer(
        var_child_runnable_config.get(),
        default=default,
        help_text=NO_CUSTOMER_FOR_FUNCTION.format(feature=feature_id),
    )


def metered(
    meter: Meter,
    feature_id: str,
    units: Units = 1,
    *,
    units_from_result: Callable[[Any], float] | None = None,
    strategy: Strategy | None = None,
    on_backend_error: FailPolicy | None = None,
    customer_id: str | None = None,
    entity_id: str | None = None,
) -> Callable[[F], F]:
    """Decorate a plain function, sync or async, so that each call is guarded.

    The customer comes from trusted context only: the innermost ``meter.customer(...)``
    block, or the config of the LangChain run the function is called from. It is never
    read from the function's arguments, so no keyword can redirect the bill.

    Args:
        meter: The meter that guards each call.
        feature_id: The feature each call uses.
        units: Units per call, or a function of the call's arguments by name
            (``units=lambda args: len(args["urls"])``).
        units_from_result: A function of the return value giving the real count.
        strategy: Overrides the meter's strategy.
        on_backend_error: Overrides the meter's fail policy.
        customer_id: Who pays when the context names nobody.
        entity_id: The entity of ``customer_id``.

    Returns:
        A decorator. The decorated function raises :class:`UsageLimitExceeded` (or
        :class:`BackendError`) instead of running when the call is refused, and
        :class:`AgentMeterError` when no customer is bound.

    Example:
        >>> @meter.metered("web_search", units=lambda args: len(args["urls"]))
        ... async def fetch_all(urls: list[str]) -> list[str]: ...
        >>> with meter.customer("cus_1"):
        ...     pages = await fetch_all(["https://a", "https://b"])   # 2 units
    """
    _check_options(
        meter,
        feature_id,
        units=units,
        on_denied="raise",
        strategy=strategy,
        on_backend_error=on_backend_error,
        units_from_result=units_from_result,
    )
    default = default_customer(customer_id, entity_id)

    def decorate(function: F) -> F:
        signature = inspect.signature(function) if callable(units) else None

        def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[CustomerRef, float]:
            ref = _function_customer(feature_id, default)
            if signature is None:
                return ref, cast("float", units)
            # binding is the validation a plain function has: a wrong call raises TypeError
            # here, as it would calling the function, before anything is checked or billed
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return ref, count_units(units, bound.arguments)

        def settle(call: GuardedCall, result: object) -> None:
            if units_from_result is not None:
                _bill_actual(call, units_from_result, result, function.__qualname__)

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                ref, count = prepare(args, kwargs)
                async with meter.aguard(
                    ref.customer_id,
                    feature_id,
                    count,
                    entity_id=ref.entity_id,
                    strategy=strategy,
                    on_backend_error=on_backend_error,
                ) as call:
                    result = await function(*args, **kwargs)
                    settle(call, result)
                return result

            return cast("F", guarded_async)

        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            ref, count = prepare(args, kwargs)
            with meter.guard(
                ref.customer_id,
                feature_id,
                count,
                entity_id=ref.entity_id,
                strategy=strategy,
                on_backend_error=on_backend_error,
            ) as call:
                result = function(*args, **kwargs)
                settle(call, result)
            return result

        return cast("F", guarded)

    return decorate
