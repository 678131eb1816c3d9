"""Guard tool calls with Autumn as the billing backend.

Run it with a sandbox key:

    export AUTUMN_SECRET_KEY=am_sk_test_...
    export AUTUMN_BASE_URL=http://localhost:8080   # only for a self-hosted server
    python examples/autumn_backend.py

Without a key it prints how to set Autumn up and exits cleanly.

It expects the catalogue DESIGN.md §7 describes: a credit system ``credits`` that
``web_search`` (1 credit), ``code_exec`` (2) and ``llm_tokens`` (0.001) draw from, and an
auto-enabled plan that grants 100 credits a month.
"""

from __future__ import annotations

import os
import sys
import uuid

from agent_meter import BackendError, ConfigError, Meter, Pricing, UsageLimitExceeded
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.pricing import Plan

PRICING = Pricing(
    features={"web_search": "metered", "code_exec": "metered", "llm_tokens": "metered"},
    credit_systems={"credits": {"web_search": 1, "code_exec": 2, "llm_tokens": 0.001}},
    plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100})},
)

SETUP = """\
AUTUMN_SECRET_KEY is not set, so this example has nothing to talk to.

To run it against Autumn:
  1. Sign in at https://app.useautumn.com (or run your own server from
     github.com/useautumn/autumn and export AUTUMN_BASE_URL=<its address>).
  2. In the sandbox, create the features:
       web_search, code_exec, llm_tokens   metered, consumable
       credits                             credit system: web_search = 1,
                                           code_exec = 2, llm_tokens = 0.001
  3. Create a plan with auto-enable on that includes 100 credits per month.
  4. Copy a sandbox secret key (Developer > API keys) and run:
       export AUTUMN_SECRET_KEY=am_sk_test_...
       python examples/autumn_backend.py

Offline, the same code runs on the embedded backend:
  Meter(SQLiteBackend("usage.db", pricing=Pricing.from_file("pricing.toml")))
"""


def search(query: str) -> str:
    return f"results for {query!r}"


def main() -> int:
    if not os.environ.get("AUTUMN_SECRET_KEY"):
        print(SETUP)
        return 0

    customer = f"cus_example_{uuid.uuid4().hex[:8]}"  # a new customer: 100 credits
    backend = AutumnBackend(timeout=5.0, max_retries=3)  # AUTUMN_SECRET_KEY, AUTUMN_BASE_URL
    with Meter(backend, pricing=PRICING) as meter:
        try:
            meter.verify()  # every feature exists in Autumn, in the right credit system
        except ConfigError as exc:
            print(f"Autumn is not set up as this example expects:\n{exc}\n\n{SETUP}")
            return 0
        except BackendError as exc:  # a wrong key, or Autumn out of reach
            print(f"Could not use Autumn: {exc}")
            return 0

        before = meter.check(customer, "web_search")
        print(f"{customer}: {before.balance} {before.balance_feature_id} to start")

        # lock (the default on Autumn): the credits are held under a unique lock id before
        # the call, confirmed when it succeeds and released, exactly, if it fails.
        with meter.guard(customer, "web_search", call_id="search_1"):
            print(search("billing guards for agents"))

        try:
            with meter.guard(customer, "code_exec", call_id="exec_1"):
                raise RuntimeError("the sandbox crashed")
        except RuntimeError as exc:
            print(f"code_exec failed ({exc}): released")

        # Tokens are tracked in batches, with a key so a retry never bills twice.
        meter.track(customer, "llm_tokens", 1830, idempotency_key="run_1:llm")
        meter.track(customer, "llm_tokens", 1830, idempotency_key="run_1:llm")  # no-op

        after = meter.check(customer, "web_search")
        print(f"{customer}: {after.balance} {after.balance_feature_id} left (expected 97.17)")

        try:
            meter.gate(customer, "llm_tokens", units=1_000_000)
        except UsageLimitExceeded as exc:
            print(f"a million tokens? {exc.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
