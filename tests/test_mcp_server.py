"""MeteringMiddleware on a real FastMCP server, called by a real MCP client.

Each scenario runs in process (``fastmcp.Client(server)``, who pays fixed by the server's
resolver) and over streamable HTTP on 127.0.0.1 (who pays: the client id of the bearer
token fastmcp's auth provider verified).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_meter import ConfigError, CustomerRef, Meter, SQLiteBackend
from agent_meter.mcp import MeteringMiddleware, from_access_token
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import example_pricing
from tests.mcp_helpers import CUSTOMER, OTHER, Served, serve, text

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ["memory", "http"]
DENIED = "web_search is unavailable: 0 credits left, 1 needed"


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(pricing=example_pricing())


def credits(backend: Any, customer: str = CUSTOMER) -> float:
    return float(backend.balances(customer)["credits"])


def billed(backend: Any, customer: str = CUSTOMER) -> float:
    """Net units billed to ``customer`` (reservations and tracks, refunds included)."""
    return float(sum(e.value for e in backend.events(customer) if e.kind != "denied"))


async def call(served: Served, name: str, args: dict[str, Any], bearer: str = "tok-1") -> Any:
    async with served.client(bearer) as client:
        return await client.call_tool(name, args, raise_on_error=False)


# -- billed per success, refunded per failure ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_successful_call_is_billed(transport: str, backend: MemoryBackend) -> None:
    async with serve(transport, Meter(backend)) as served, served.client() as client:
        first = await client.call_tool("search", {"query": "mcp"})
        second = await client.call_tool("run_python", {"code": "1 + 1"})
        third = await client.call_tool("search", {"query": "billing"})
    assert (text(first), text(second), text(third)) == (
        "results for mcp",
        "5",
        "results for billing",
    )
    assert served.work.ran == [("search", "mcp"), ("run_python", "1 + 1"), ("search", "billing")]
    assert credits(backend) == 100 - 1 - 2 - 1
    assert [e.kind for e in backend.events(CUSTOMER)] == ["reserve"] * 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_raising_tool_is_refunded(transport: str, backend: MemoryBackend) -> None:
    async with serve(transport, Meter(backend)) as served:
        result = await call(served, "run_python", {"code": "import os"})
    assert result.is_error
    assert "imports are not allowed" in text(result)
    assert served.work.count("run_python") == 1  # it ran, and failed
    assert credits(backend) == 100
    assert billed(backend) == 0
    assert [e.kind for e in backend.events(CUSTOMER)] == ["reserve", "track"]  # hold, refund


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_is_error_result_is_refunded(transport: str, backend: MemoryBackend) -> None:
    async with serve(transport, Meter(backend)) as served:
        result = await call(served, "broken", {"query": "q"})
    assert result.is_error
    assert text(result) == "upstream failed for q"  # the tool's own result, untouched
    assert served.work.count("broken") == 1
    assert credits(backend) == 100
    assert billed(backend) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_denied_call_never_runs_the_tool(transport: str, backend: MemoryBackend) -> None:
    backend.set_balance(CUSTOMER, "credits", 1)
    async with serve(transport, Meter(backend)) as served, served.client() as client:
        code = await client.call_tool("run_python", {"code": "1"}, raise_on_error=False)
        ok = await client.call_tool("search", {"query": "a"}, raise_on_error=False)
        denied = await client.call_tool("search", {"query": "b"}, raise_on_error=False)
    assert code.is_error
    assert text(code).startswith("code_exec is unavailable: 1 credit")  # "1 credit(s) left"
    assert text(code).endswith(", 2 needed")
    assert not ok.is_error
    assert denied.is_error
    assert text(denied) == DENIED
    assert served.work.ran == [("search", "a")]  # the refused calls never ran
    assert credits(backend) == 0
    assert [e.kind for e in backend.events(CUSTOMER)] == ["denied", "reserve", "denied"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_tool_argument_naming_another_customer_changes_nothing(
    transport: str, backend: MemoryBackend
) -> None:
    backend.set_balance(OTHER, "credits", 0)
    async with serve(transport, Meter(backend)) as served:
        result = await call(served, "search", {"query": "q", "customer_id": OTHER})
    assert not result.is_error
    assert credits(backend) == 99  # the authenticated caller paid
    assert credits(backend, OTHER) == 0
    assert backend.events(OTHER) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_listing_tools_is_never_metered(transport: str, backend: MemoryBackend) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    async with serve(transport, Meter(backend)) as served, served.client() as client:
        tools = await client.list_tools()
        free = await client.call_tool("help", {})
    assert {tool.name for tool in tools} == {"search", "run_python", "broken", "fetch", "help"}
    assert text(free) == "ask me anything"  # a tool priced None is free
    assert backend.events(CUSTOMER) == []


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_fifty_concurrent_calls_against_ten_credits_run_exactly_ten(
    transport: str, kind: str, tmp_path: Path
) -> None:
    if kind == "memory":
        ledger: Any = MemoryBackend(pricing=example_pricing())
    else:
        ledger = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
    ledger.set_balance(CUSTOMER, "credits", 10)
    async with serve(transport, Meter(ledger)) as served, served.client() as client:
        results = await asyncio.gather(
            *(
                client.call_tool("search", {"query": f"q{i}"}, raise_on_error=False)
                for i in range(50)
            )
        )
    assert served.work.peak > 1, "the calls did not overlap: nothing was tested"
    assert served.work.count("search") == 10
    assert sum(not r.is_error for r in results) == 10
    assert [text(r) for r in results if r.is_error] == [DENIED] * 40
    assert credits(ledger) == 0
    assert [e.kind for e in ledger.events(CUSTOMER)].count("reserve") == 10


# -- units -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_units_come_from_the_arguments(transport: str, backend: MemoryBackend) -> None:
    async with serve(transport, Meter(backend)) as served, served.client() as client:
        three = await client.call_tool("fetch", {"urls": ["a", "b", "c"]})
        too_many = await client.call_tool("fetch", {"urls": ["x"] * 200}, raise_on_error=False)
        bad = await client.call_tool("fetch", {"pages": ["a"]}, raise_on_error=False)
    assert text(three) == "3 pages"
    assert too_many.is_error
    assert text(too_many) == "web_search is unavailable: 97 credits left, 200 needed"
    assert bad.is_error  # the units function could not count: refused, nothing billed
    assert "fetch was not run: its arguments are invalid" in text(bad)
    assert served.work.ran == [("fetch", ["a", "b", "c"])]
    assert credits(backend) == 97


async def test_units_from_the_result_replace_the_estimate(backend: MemoryBackend) -> None:
    def pages(result: Any) -> float:
        return float(result.content[0].text.split()[0]) - 1  # the first page is free

    async with serve("memory", Meter(backend), units_from_result={"fetch": pages}) as served:
        result = await call(served, "fetch", {"urls": ["a", "b", "c"]})
    assert not result.is_error
    assert credits(backend) == 98
    assert billed(backend) == 2


# -- who pays ----------------------------------------------------------------------------


async def test_two_clients_with_different_tokens_pay_for_their_own_calls(
    backend: MemoryBackend,
) -> None:
    async with (
        serve("http", Meter(backend)) as served,
        served.client("tok-1") as one,
        served.client("tok-2") as two,
    ):
        await asyncio.gather(
            one.call_tool("search", {"query": "a"}),
            two.call_tool("run_python", {"code": "1"}),
            one.call_tool("search", {"query": "b", "customer_id": OTHER}),
            two.call_tool("search", {"query": "c", "customer_id": CUSTOMER}),
        )
    assert credits(backend, CUSTOMER) == 98  # two searches
    assert credits(backend, OTHER) == 97  # code (2) and a search
    assert sorted(e.feature_id for e in backend.events(OTHER)) == ["code_exec", "web_search"]


async def test_an_unknown_token_never_reaches_the_tool(backend: MemoryBackend) -> None:
    async with serve("http", Meter(backend)) as served:
        with pytest.raises(Exception, match=r"401|nauthorized|error response"):
            await call(served, "search", {"query": "q"}, bearer="forged")
    assert served.work.ran == []
    assert backend.customers() == []


async def test_the_customer_can_come_from_a_token_claim(backend: MemoryBackend) -> None:
    tokens = {
        "tok-org": {"client_id": "app", "org": "cus_acme", "seat": "seat_7", "scopes": []},
        "tok-none": {"client_id": "app", "scopes": []},  # no org claim: nobody pays
    }
    resolver = from_access_token("org", entity_claim="seat")
    async with serve("http", Meter(backend), tokens=tokens, customer=resolver) as served:
        paid = await call(served, "search", {"query": "a"}, bearer="tok-org")
        refused = await call(served, "search", {"query": "b"}, bearer="tok-none")
    assert not paid.is_error
    assert refused.is_error
    assert "not linked to a paying customer" in text(refused)
    assert served.work.ran == [("search", "a")]
    assert [(e.customer_id, e.entity_id) for e in backend.events()] == [("cus_acme", "seat_7")]


async def test_a_call_without_a_customer_is_refused_and_not_run(backend: MemoryBackend) -> None:
    # In process there is no bearer token: the default resolver finds nobody to bill.
    async with serve("memory", Meter(backend), customer=None) as served:
        result = await call(served, "search", {"query": "q"})
    assert result.is_error
    assert text(result) == (
        "web_search is unavailable: this request is not linked to a paying customer "
        "(authenticate first), so the tool was not run and nothing was charged"
    )
    assert served.work.ran == []
    assert backend.customers() == []


async def test_a_failing_resolver_refuses_the_call(backend: MemoryBackend) -> None:
    def broken(context: Any) -> str:
        raise RuntimeError("directory down")

    async with serve("memory", Meter(backend), customer=broken) as served:
        result = await call(served, "search", {"query": "q"})
    assert result.is_error
    assert "directory down" not in text(result)
    assert served.work.ran == []
    assert backend.customers() == []


async def test_an_async_resolver_may_name_an_entity(backend: MemoryBackend) -> None:
    async def resolver(context: Any) -> tuple[str, str]:
        assert context.method == "tools/call"
        return ("cus_team", "ws_1")

    async with serve("memory", Meter(backend), customer=resolver) as served:
        await call(served, "search", {"query": "q"})
    assert [(e.customer_id, e.entity_id) for e in backend.events()] == [("cus_team", "ws_1")]


async def test_a_resolver_naming_a_malformed_customer_is_refused(backend: MemoryBackend) -> None:
    async with serve("memory", Meter(backend), customer=lambda context: "") as served:
        result = await call(served, "search", {"query": "q"})
    assert result.is_error
    assert served.work.ran == []


# -- features, strategies, fail policy -----------------------------------------------------


async def test_a_tool_without_a_feature_is_refused(backend: MemoryBackend) -> None:
    async with serve("memory", Meter(backend), features={"search": "web_search"}) as served:
        result = await call(served, "fetch", {"urls": ["a"]})
    assert result.is_error
    assert text(result).startswith("fetch is unavailable: it has no price on this server")
    assert served.work.ran == []


async def test_the_default_feature_prices_unlisted_tools(backend: MemoryBackend) -> None:
    options: dict[str, Any] = {"features": {}, "default_feature": "code_exec", "units": 1}
    async with serve("memory", Meter(backend), **options) as served:
        await call(served, "help", {})
    assert credits(backend) == 98


async def test_an_unreachable_billing_service_refuses_under_deny(backend: MemoryBackend) -> None:
    backend.fail(method="check")
    async with serve("memory", Meter(backend)) as served:
        result = await call(served, "search", {"query": "q"})
    assert result.is_error
    assert text(result).startswith("web_search is unavailable: the billing service is unreachable")
    assert CUSTOMER not in text(result)
    assert served.work.ran == []


async def test_check_then_track_bills_a_success_and_not_a_failure(
    backend: MemoryBackend,
) -> None:
    async with serve("memory", Meter(backend), strategy="check_then_track") as served:
        await call(served, "search", {"query": "q"})
        await call(served, "broken", {"query": "q"})
    assert [e.kind for e in backend.events(CUSTOMER)] == ["track"]
    assert credits(backend) == 99


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": {"search": "nope"}}, "unknown feature 'nope'"),
        ({"features": {"search": ""}}, "non-empty"),
        ({"features": ["search"]}, "features must map"),
        ({"features": {}, "default_feature": "nope"}, "unknown feature 'nope'"),
        ({"features": {}, "units": -1}, "units for 'every tool'"),
        ({"features": {}, "units": {"fetch": "3"}}, "units for 'fetch'"),
        ({"features": {}, "units_from_result": 3}, "units_from_result"),
        ({"features": {}, "strategy": "later"}, "strategy must be one of"),
        ({"features": {}, "on_backend_error": "maybe"}, "on_backend_error must be one of"),
        ({"features": {}, "customer": "cus_1"}, "customer must be a function"),
    ],
)
def test_a_wrong_wiring_is_refused_when_built(
    backend: MemoryBackend, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        MeteringMiddleware(Meter(backend), **options)


def test_the_claim_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="claim"):
        from_access_token("")


async def test_a_resolver_may_return_a_customer_ref(backend: MemoryBackend) -> None:
    ref = CustomerRef.of("cus_ref", "ws_2")
    async with serve("memory", Meter(backend), customer=lambda context: ref) as served:
        await call(served, "search", {"query": "q"})
    assert [(e.customer_id, e.entity_id) for e in backend.events()] == [("cus_ref", "ws_2")]


def test_importing_without_fastmcp_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['fastmcp'] = None  # as if it were not installed\n"
        "try:\n"
        "    import agent_meter.mcp\n"
        "except ImportError as error:  # MissingExtra is both an ImportError and a ConfigError\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MissingExtra agent_meter.mcp needs the 'mcp' extra")
    assert "pip install 'agent-meter[mcp]'" in done.stdout


def test_the_middleware_needs_no_langchain() -> None:
    # The mcp extra installs fastmcp only: a refusal must not reach for LangChain.
    code = (
        "import asyncio, sys\n"
        "sys.modules['langchain_core'] = None  # as if it were not installed\n"
        "from fastmcp import Client, FastMCP\n"
        "from agent_meter import Meter, Pricing\n"
        "from agent_meter.backends.memory import MemoryBackend\n"
        "from agent_meter.mcp import MeteringMiddleware\n"
        "backend = MemoryBackend(pricing=Pricing.example())\n"
        "backend.set_balance('cus_1', 'credits', 0)\n"
        "mcp = FastMCP('t')\n"
        "mcp.tool(lambda q: q, name='search')\n"
        "mcp.add_middleware(MeteringMiddleware(Meter(backend), features={'search': 'web_search'},\n"
        "                                      customer=lambda context: 'cus_1'))\n"
        "async def main():\n"
        "    async with Client(mcp) as client:\n"
        "        result = await client.call_tool('search', {'q': 'x'}, raise_on_error=False)\n"
        "    print(result.is_error, result.content[0].text)\n"
        "asyncio.run(main())\n"
        "loaded = [name for name, module in sys.modules.items() if module is not None]\n"
        "assert not [name for name in loaded if name.startswith('langchain')], loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True web_search is unavailable: 0 credits left, 1 needed"


def test_mcp_names_resolve() -> None:
    import agent_meter.mcp  # noqa: PLC0415

    assert agent_meter.mcp.__all__ == [
        "CustomerResolver",
        "MeteringMiddleware",
        "Resolved",
        "Units",
        "UnitsFromResult",
        "from_access_token",
    ]
    for name in agent_meter.mcp.__all__:
        assert getattr(agent_meter.mcp, name) is not None
