"""A paid FastMCP server for the MCP tests, served in process or over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastmcp import Client, FastMCP
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from fastmcp.tools import ToolResult

from agent_meter import Meter
from agent_meter.mcp import MeteringMiddleware

CUSTOMER = "cus_1"
OTHER = "cus_2"

# Bearer tokens the server's auth provider accepts, and whom each was issued to.
TOKENS: dict[str, dict[str, Any]] = {
    "tok-1": {"client_id": CUSTOMER, "scopes": []},
    "tok-2": {"client_id": OTHER, "scopes": []},
}

FEATURES: dict[str, str | None] = {
    "search": "web_search",
    "run_python": "code_exec",
    "broken": "web_search",
    "fetch": "web_search",
    "help": None,  # free
}


class Work:
    """What the tools' bodies really did: the calls that ran, and how many overlapped."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, Any]] = []
        self.running = 0
        self.peak = 0

    def count(self, name: str) -> int:
        return sum(1 for tool, _ in self.ran if tool == name)


def build_server(meter: Meter, work: Work, *, auth: Any = None, **options: Any) -> FastMCP[Any]:
    """A server whose tools cost credits: search 1, run_python 2, fetch 1 per URL."""
    mcp: FastMCP[Any] = FastMCP("paid-tools", auth=auth)

    @mcp.tool
    async def search(query: str, customer_id: str | None = None) -> str:
        """Search the web (``customer_id`` is an argument a caller may try to bill to)."""
        work.running += 1
        work.peak = max(work.peak, work.running)
        try:
            await asyncio.sleep(0.01)  # long enough for concurrent calls to overlap
            work.ran.append(("search", query))
        finally:
            work.running -= 1
        return f"results for {query}"

    @mcp.tool
    def run_python(code: str) -> str:
        """Run Python code; raises on imports."""
        work.ran.append(("run_python", code))
        if "import" in code:
            msg = "imports are not allowed"
            raise ValueError(msg)
        return str(len(code))

    @mcp.tool
    def broken(query: str) -> ToolResult:
        """A tool that reports its failure as an isError result instead of raising."""
        work.ran.append(("broken", query))
        return ToolResult(content=f"upstream failed for {query}", is_error=True)

    @mcp.tool
    def fetch(urls: list[str]) -> str:
        """Fetch several pages: one unit per URL."""
        work.ran.append(("fetch", urls))
        return f"{len(urls)} pages"

    @mcp.tool
    def help() -> str:
        """A free tool."""
        work.ran.append(("help", None))
        return "ask me anything"

    options.setdefault("features", FEATURES)
    options.setdefault("units", {"fetch": lambda args: len(args["urls"])})
    mcp.add_middleware(MeteringMiddleware(meter, **options))
    return mcp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_http(server: FastMCP[Any]) -> Iterator[str]:
    """Serve ``server`` over streamable HTTP on 127.0.0.1 in a thread; yields its URL."""
    port = free_port()
    app = server.http_app(transport="streamable-http")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="mcp-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            msg = "the test MCP server did not start"
            raise RuntimeError(msg)
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


class Served:
    """A running paid server and how to open clients to it."""

    def __init__(self, server: FastMCP[Any], work: Work, url: str | None) -> None:
        self.server = server
        self.work = work
        self.url = url

    def client(self, bearer: str | None = "tok-1") -> Client[Any]:
        """A real MCP client: in process, or over HTTP with ``bearer`` as its bearer token."""
        if self.url is None:
            return Client(self.server)
        return Client(self.url, auth=bearer)


@contextlib.asynccontextmanager
async def serve(
    transport: str, meter: Meter, *, tokens: dict[str, dict[str, Any]] | None = None, **options: Any
) -> AsyncIterator[Served]:
    """The paid server in process (who pays: ``CUSTOMER``) or over HTTP (who pays: the
    verified bearer token's client id), with ``options`` for its middleware."""
    work = Work()
    if transport == "memory":
        options.setdefault("customer", lambda context: CUSTOMER)
        yield Served(build_server(meter, work, **options), work, None)
        return
    server = build_server(meter, work, auth=StaticTokenVerifier(tokens or TOKENS), **options)
    with serve_http(server) as url:
        yield Served(server, work, url)


def text(result: Any) -> str:
    """The text of a CallToolResult."""
    return "".join(getattr(block, "text", "") for block in result.content)
