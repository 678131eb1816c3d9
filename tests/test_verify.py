"""meter.verify(): every metered feature exists where it is billed, drawing as expected.

The embedded backends answer from their pricing. Autumn answers from ``GET /v1/features``
(autumn-py has no call for it; it goes through autumn-py's HTTP layer). No cassette
records that endpoint, so a local server answers it with the documented shape: a
``list`` of features, credit systems carrying ``credit_schema`` rows of
``metered_feature_id`` and ``credit_cost`` (the same shape the recorded customer answer
embeds for the ``credits`` feature).
"""

from __future__ import annotations

from typing import Any

import pytest

from agent_meter import BackendError, ConfigError, Meter, Pricing, SQLiteBackend
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.pricing import Plan
from agent_meter.testing import MemoryBackend
from agent_meter.verification import CatalogueEntry, catalogue_from_pricing, find_problems
from tests.autumn_helpers import PRICING, SECRET, FaultServer, Reply, error_body


def autumn_features(**overrides) -> dict[str, Any]:
    """The seeded Autumn catalogue of the cassettes, as GET /v1/features lists it."""
    schema = [
        {"metered_feature_id": "web_search", "credit_cost": 1},
        {"metered_feature_id": "llm_tokens", "credit_cost": 0.001},
        {"metered_feature_id": "code_exec", "credit_cost": 2},
    ]
    features = {
        "web_search": {"id": "web_search", "type": "single_use", "archived": False},
        "code_exec": {"id": "code_exec", "type": "single_use", "archived": False},
        "llm_tokens": {"id": "llm_tokens", "type": "single_use", "archived": False},
        "premium_tools": {"id": "premium_tools", "type": "boolean", "archived": False},
        "credits": {
            "id": "credits",
            "type": "credit_system",
            "archived": False,
            "credit_schema": schema,
        },
    }
    for feature_id, value in overrides.items():
        if value is None:
            features.pop(feature_id)
        else:
            features[feature_id] = value
    return {"list": list(features.values())}


# -- Autumn ------------------------------------------------------------------------------


def test_autumn_catalogue_matching_the_pricing_passes_in_one_request():
    with FaultServer([Reply(200, autumn_features())]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url), pricing=PRICING)
        meter.verify()
        meter.close()
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/v1/features")]


def test_autumn_catalogue_reads_pools_and_costs():
    with FaultServer([Reply(200, autumn_features())]) as server:
        backend = AutumnBackend(SECRET, base_url=server.url)
        catalogue = backend.catalogue()
        backend.close()
    assert catalogue["llm_tokens"] == CatalogueEntry("llm_tokens", "metered", "credits", 0.001)
    assert catalogue["premium_tools"].kind == "boolean"
    assert catalogue["credits"].kind == "credit_system"


def test_autumn_problems_are_reported_all_at_once():
    catalogue = autumn_features(
        web_search=None,  # missing
        code_exec={"id": "code_exec", "type": "single_use", "archived": True},
        credits={
            "id": "credits",
            "type": "credit_system",
            "credit_schema": [
                {"metered_feature_id": "llm_tokens", "credit_cost": 0.002},
                {"metered_feature_id": "code_exec", "credit_cost": 2},
            ],
        },
    )
    with FaultServer([Reply(200, catalogue)]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url), pricing=PRICING)
        with pytest.raises(ConfigError) as info:
            meter.verify()
        meter.close()
    message = str(info.value)
    assert "3 problems" in message
    assert "'web_search' does not exist in Autumn" in message
    assert "'code_exec' is archived in Autumn" in message
    assert "'llm_tokens' costs 0.002 credits per unit in Autumn, the pricing says 0.001" in message
    assert len(server.requests) == 1


def test_autumn_feature_in_the_wrong_pool_or_none():
    catalogue = autumn_features(
        credits={
            "id": "credits",
            "type": "credit_system",
            "credit_schema": [{"metered_feature_id": "web_search", "credit_cost": 1}],
        },
        tokens_pool={
            "id": "tokens_pool",
            "type": "credit_system",
            "credit_schema": [{"metered_feature_id": "llm_tokens", "credit_cost": 0.001}],
        },
    )
    with FaultServer([Reply(200, catalogue)]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url), pricing=PRICING)
        with pytest.raises(ConfigError) as info:
            meter.verify(features=["web_search", "llm_tokens", "code_exec"])
        meter.close()
    message = str(info.value)
    assert "'llm_tokens' draws from 'tokens_pool' in Autumn, expected 'credits'" in message
    assert "'code_exec' draws from no credit system in Autumn, expected 'credits'" in message
    assert "web_search" not in message


def test_autumn_verify_of_named_features_without_pricing_checks_existence():
    with FaultServer([Reply(200, autumn_features())]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url))
        meter.verify(features=["web_search", "premium_tools"])
        with pytest.raises(ConfigError, match="'web_serch' does not exist in Autumn"):
            meter.verify(features=["web_serch"])
        with pytest.raises(ConfigError, match="'credits' is a credit system"):
            meter.verify(features="credits")  # one id, not its letters
        meter.close()
    assert len(server.requests) == 3


def test_autumn_verify_with_a_wrong_key_is_a_backend_error():
    body = error_body("invalid_secret_key", "Invalid secret key: am_sk_test_s3cr***")
    with FaultServer([Reply(401, body)]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url), pricing=PRICING)
        with pytest.raises(BackendError, match="rejected the secret key") as info:
            meter.verify()
        meter.close()
    assert "s3cr" not in str(info.value)


def test_autumn_boolean_where_the_pricing_meters_is_reported():
    catalogue = autumn_features(web_search={"id": "web_search", "type": "boolean"})
    with FaultServer([Reply(200, catalogue)]) as server:
        meter = Meter(AutumnBackend(SECRET, base_url=server.url), pricing=PRICING)
        with pytest.raises(ConfigError, match="'web_search' is boolean in Autumn, the pricing"):
            meter.verify(features=["web_search"])
        meter.close()


# -- embedded backends -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def embedded(request, tmp_path):
    backend: SQLiteBackend | MemoryBackend
    if request.param == "sqlite":
        backend = SQLiteBackend(tmp_path / "verify.db", pricing=PRICING)
    else:
        backend = MemoryBackend(pricing=PRICING)
    yield backend
    backend.close()


def test_embedded_backends_answer_from_their_pricing(embedded):
    meter = Meter(embedded)
    meter.verify()
    meter.verify(features=["web_search", "llm_tokens"])
    with pytest.raises(ConfigError) as info:
        meter.verify(features=["web_search", "web_serch", "image_gen"])
    message = str(info.value)
    assert "2 problems" in message
    assert "'web_serch' does not exist" in message
    assert "'image_gen' does not exist" in message


def test_embedded_backend_with_a_different_meter_pricing_reports_the_drift(embedded):
    drifted = Pricing(
        features=dict(PRICING.features),
        credit_systems={"credits": {"web_search": 1, "code_exec": 3, "llm_tokens": 0.001}},
        plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100})},
    )
    meter = Meter(embedded, pricing=drifted)
    with pytest.raises(ConfigError, match="'code_exec' costs 2 credits per unit"):
        meter.verify()


def test_a_backend_without_a_catalogue_cannot_be_verified():
    class Bare:
        def check(self, *args, **kwargs): ...
        def track(self, *args, **kwargs): ...
        def close(self): ...

    with pytest.raises(ConfigError, match="cannot verify"):
        Meter(Bare()).verify(features=["web_search"])  # type: ignore[arg-type]  # on purpose


# -- the pure comparison -----------------------------------------------------------------


def test_find_problems_is_empty_for_the_pricing_against_itself():
    assert find_problems(PRICING.features, catalogue_from_pricing(PRICING), PRICING) == []


def test_a_feature_unknown_to_the_pricing_is_reported():
    catalogue = {"extra": CatalogueEntry("extra", "metered")}
    assert find_problems(["extra"], catalogue, PRICING, where="X") == [
        "feature 'extra' exists in X but not in the meter's pricing"
    ]
