"""Fuzzing the HTTP API (tracin-index serve) from its own OpenAPI schema, with schemathesis, against a small index.

Whatever a client sends, valid or not: no 5xx; a 4xx is ``{"error": "one line"}``; a 2xx fits the schema; the
server keeps answering (health, and a known query as the index answers it), and its memory stays flat. The
server runs as ``serve`` runs it, with a token: the fuzzers send it, and without it every request is refused.

The runs are reproducible: every fuzzer runs under ``@seed(SEED)`` with no example database; the
``@example`` cases are requests that once got a 500 (each one fixed in the app).
"""

import gc
import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from tracin_index.index import GradientIndex

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx", reason="httpx (the test client) is not installed")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (the [test] extra) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import response_schema_conformance  # noqa: E402

from tracin_index.serve.app import MAX_LABEL, create_app  # noqa: E402

#: The seed of every fuzzer here: the same requests on every run and machine.
SEED = 20261204
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Resident memory three rounds of fuzzed requests may add to a warm server (it holds about 540 MB, most of it torch).
MEMORY_BOUND = 6 * 2**20


@dataclass
class Api:
    index: GradientIndex
    client: TestClient
    schema: object  # schemathesis' view of the app's /openapi.json


@pytest.fixture(scope="module")
def api(tiny_index) -> Api:
    index = GradientIndex.open(tiny_index, device="cpu")
    app = create_app(index, token=TOKEN)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    return Api(index, TestClient(app, raise_server_exceptions=False), schema)


def requests(schema):
    """Every operation's requests: those the schema allows and those it forbids (wrong types, missing parameters,
    out of range, malformed bodies)."""
    return schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)


def with_known_labels(case, pick: int | None, index: GradientIndex):
    """``case`` with labels the index knows (training triple ``pick``, top_k 1..5) where ``pick`` is given: random
    labels alone would never get past the lookup to a query."""
    if pick is None:
        return case
    h, r, t = (int(x) for x in index.hrt[pick % index.num_triples])
    head, relation, tail = index.entity_labels[h], index.relation_labels[r], index.entity_labels[t]
    known = {"head": head, "relation": relation, "tail": tail, "entity": head, "prefix": head[: 1 + pick % 3]}
    if isinstance(case.query, dict):
        case.query.update({k: v for k, v in known.items() if k in case.query})
        if "top_k" in case.query:
            case.query["top_k"] = 1 + pick % 5
    if isinstance(case.body, dict) and isinstance(case.body.get("triples"), list):
        case.body["triples"] = [{"head": head, "relation": relation, "tail": tail}] * (1 + pick % 3)
        case.body["top_k"] = 1 + pick % 5
    return case


def fuzz(api: Api, examples: int, check=lambda case, response: None, explicit=()):
    """Send ``examples`` requests drawn from the schema (the same ones every run: seed SEED), and ``explicit``
    cases first, each answer given to ``check``."""

    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=requests(api.schema), pick=st.none() | st.integers(0, 2**32 - 1))
    def send(case, pick):
        case = with_known_labels(case, pick, api.index)
        check(case, case.call(headers=AUTH))

    for case in explicit:
        send = example(case=case, pick=None)(send)
    send()


def one_line_or_fits_the_schema(case, response) -> None:
    """No 5xx; a 4xx is {"error": one line}; a 2xx fits the response schema."""
    assert response.status_code < 500, f"{response.status_code} for {case.as_curl_command()}: {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), response.text[:300]
        assert len(body["error"].splitlines()) == 1 and len(body["error"]) < 2 * MAX_LABEL, body["error"][:300]
    else:
        case.validate_response(response, checks=[response_schema_conformance])


def test_no_request_gets_a_5xx_and_every_4xx_says_why_in_one_line(api):
    query = api.schema["/api/query"]["GET"]
    fuzz(api, 300, one_line_or_fits_the_schema, explicit=[
        # ValidationError (500): TripleIn caps labels at 1,000 characters, the GET parameters did not
        query.Case(query={"head": "x" * (MAX_LABEL + 1), "relation": "r", "tail": "t"}),
        query.Case(query={"head": "1" * 5000, "relation": "1", "tail": "1"}),
    ])  # fmt: skip


@seed(SEED)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/api/health", "/api/query", "/api/relations"]),
       length=st.none() | st.integers(0, 10**6).map(str) | st.text(st.characters(max_codepoint=255), max_size=20),
       chunked=st.booleans(), authorization=st.sampled_from([AUTH["Authorization"], "", "Bearer", "bearer " + TOKEN]))
@example(path="/api/query", length="9" * 5000, chunked=False, authorization=AUTH["Authorization"])  # ValueError: int()
def test_headers_the_schema_does_not_name_get_no_5xx(api, path, length, chunked, authorization):
    """Content-Length, Transfer-Encoding and Authorization, which the guard in front of every route reads."""
    headers = {"authorization": authorization.encode("latin-1"), "content-type": "application/json"}
    if length is not None:
        headers["content-length"] = length.encode("latin-1")
    if chunked:
        headers["transfer-encoding"] = b"chunked"
    try:
        request = api.client.build_request("POST" if path == "/api/query" else "GET", path, headers=headers, content=b"{}")
    except Exception:  # a header the client itself will not send (no server can receive it)
        return
    request.headers["content-length"] = headers.get("content-length", b"2").decode("latin-1")
    response = api.client.send(request)
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        assert len(response.json()["error"].splitlines()) == 1


def test_without_the_token_every_request_is_refused_in_one_line(api):
    def refused(case, response):
        assert response.status_code == 401, f"{response.status_code} without the token: {case.as_curl_command()}"
        assert "bearer token" in response.json()["error"]

    @seed(SEED)
    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=requests(api.schema))
    def send(case):
        refused(case, case.call(headers={"Authorization": "Bearer not-the-token"}))

    send()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident memory from /proc (Linux)")
def test_memory_stays_flat_over_rounds_of_fuzzed_requests(api):
    for _ in range(3):  # warm: the model, the stored arrays, the caches, the allocator's arenas (they grow 2 rounds)
        fuzz(api, 60)
    gc.collect()
    warm = resident_bytes()
    for _ in range(3):
        fuzz(api, 60)  # the same requests again: a leak grows with every round
    gc.collect()
    grown = resident_bytes() - warm
    assert grown < MEMORY_BOUND, f"grew {grown / 2**20:.1f} MiB over 180 requests to a warm server"


def test_after_the_fuzzers_the_server_answers_health_and_a_query_as_the_index_does(api):
    fuzz(api, 50)
    health = api.client.get("/api/health", headers=AUTH)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    h, r, t = (int(x) for x in api.index.hrt[0])
    params = {"head": api.index.entity_labels[h], "relation": api.index.relation_labels[r],
              "tail": api.index.entity_labels[t], "top_k": 3}  # fmt: skip
    response = api.client.get("/api/query", params=params, headers=AUTH)
    assert response.status_code == 200
    (expected,) = api.index.query(api.index.hrt[:1], top_k=3)
    (got,) = response.json()["results"]
    assert got["proponents"] == expected.to_json()["proponents"] and got["opponents"] == expected.to_json()["opponents"]
