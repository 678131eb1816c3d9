"""A paid MCP server: every tool call checked against the caller's credits, successes billed.

What it shows, offline (the server listens on 127.0.0.1 only; no API key, no account):

1. ``MeteringMiddleware`` on a FastMCP server: search costs 1 credit, run_python 2.
2. Who pays is the client the bearer token was issued to (fastmcp's auth provider checks
   the token), never a tool argument: a caller that passes ``customer_id="cus_acme"``
   still pays for itself.
3. A tool that raises is refunded; a caller without enough credit is answered with an
   ``isError`` result and the tool does not run; listing tools is free.

Run it from the repository root:

    python examples/mcp_server.py            # the demonstration below, then exits
    python examples/mcp_server.py --serve    # keep serving on http://127.0.0.1:8765/mcp

The ledger is a SQLite file in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastmcp import Client, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.mcp import MeteringMiddleware
from agent_meter.pricing import Plan

PRICING = Pricing(
    features={"web_search": "metered", "code_exec": "metered"},
    credit_systems={"credits": {"web_search": 1, "code_exec": 2}},
    plans={"starter": Plan(auto_enable=True, grants={"credits": 100})},
)

# In production a real verifier (JWTVerifier, an OAuth provider) checks the tokens; the
# client id it reports is the customer id in the ledger.
TOKENS = {
    "acme-secret": {"client_id": "cus_acme", "scopes": []},
    "globex-secret": {"client_id": "cus_globex", "scopes": []},
}


def build_server(meter: Meter) -> FastMCP[Any]:
    mcp: FastMCP[Any] = FastMCP("paid-tools", auth=StaticTokenVerifier(TOKENS))

    @mcp.tool
    def search(query: str, customer_id: str = "") -> str:
        """Search the web (customer_id is ignored for billing: who pays is the caller)."""
        return f"3 results for {query!r}"

    @mcp.tool
    def run_python(code: str) -> str:
        """Run a Python expression."""
        if "import" in code:
            msg = "imports are not allowed"
            raise ToolError(msg)  # the client reads it as an isError result
        return str(len(code))

    mcp.add_middleware(
        MeteringMiddleware(meter, features={"search": "web_search", "run_python": "code_exec"})
    )
    return mcp


def start(server: FastMCP[Any], port: int) -> tuple[uvicorn.Server, threading.Thread]:
    # Stateless: every request carries its bearer token and stands on its own.
    app = server.http_app(transport="streamable-http", stateless_http=True)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    return uv, thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def text(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def demonstrate(url: str, backend: SQLiteBackend) -> None:
    async with Client(url, auth="acme-secret") as acme:
        names = [tool.name for tool in await acme.list_tools()]
        print(f"1. cus_acme lists the tools for free: {names}")
        await acme.call_tool("search", {"query": "billing guards"})
        await acme.call_tool("run_python", {"code": "1 + 1"})
        failed = await acme.call_tool("run_python", {"code": "import os"}, raise_on_error=False)
        print(f"   a failing call is refunded: {text(failed)}")
    left = backend.balances("cus_acme")["credits"]
    print(f"   cus_acme: 100 - 1 (search) - 2 (run_python) = {left:g} credits")

    backend.set_balance("cus_globex", "credits", 1)
    async with Client(url, auth="globex-secret") as globex:
        redirected = {"query": "free lunch", "customer_id": "cus_acme"}
        await globex.call_tool("search", redirected)
        print("2. cus_globex asks to bill cus_acme; the bill goes to the token's owner:")
        globex_left = backend.balances("cus_globex")["credits"]
        acme_left = backend.balances("cus_acme")["credits"]
        print(f"   cus_globex: {globex_left:g} credits left, cus_acme still {acme_left:g}")
        refused = await globex.call_tool("run_python", {"code": "2 * 21"}, raise_on_error=False)
        print(f"3. out of credit, the tool does not run: isError={refused.is_error}")
        print(f"   {text(refused)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep serving on port 8765")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "usage.db", pricing=PRICING)
        server = build_server(Meter(backend))
        port = 8765 if options.serve else free_port()
        uv, thread = start(server, port)
        url = f"http://127.0.0.1:{port}/mcp"
        try:
            if options.serve:
                print(f"serving {url}; bearer tokens: {', '.join(TOKENS)}; Ctrl-C stops")
                thread.join()
            else:
                asyncio.run(demonstrate(url, backend))
        except KeyboardInterrupt:
            pass
        finally:
            uv.should_exit = True
            thread.join()
            backend.close()


if __name__ == "__main__":
    main()
