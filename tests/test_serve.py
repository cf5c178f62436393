"""tracin-index serve: the JSON API against the index's own query (which is tested against exact TracIn),
and its refusals, through FastAPI's test client."""

import pytest
from test_index import run_ids

from tracin_index.index import GradientIndex

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx", reason="httpx (the test client) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from tracin_index.serve.app import MAX_BATCH, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    index = GradientIndex.build(tmp_path_factory.mktemp("serve") / "index", model_path=tiny_run, sketch_dim=16, device="cpu")
    return index, TestClient(create_app(index), raise_server_exceptions=False)


def labels_of(index, ids):
    h, r, t = (int(x) for x in ids)
    return index.entity_labels[h], index.relation_labels[r], index.entity_labels[t]


def test_query_answers_what_the_index_answers(served, tiny_run):
    index, client = served
    _, _, test = run_ids(tiny_run)
    head, relation, tail = labels_of(index, test[0])
    response = client.get("/api/query", params={"head": head, "relation": relation, "tail": tail, "top_k": 5})
    assert response.status_code == 200
    body = response.json()
    expected = index.query(test[:1], top_k=5)[0].to_json()
    (got,) = body["results"]
    assert got["proponents"] == expected["proponents"] and got["opponents"] == expected["opponents"]
    assert got["test_triple"] == {"head": head, "relation": relation, "tail": tail}
    assert body["config"]["scores"] == "exact" and body["config"]["direction"] == "tail"
    # a batch, in another direction
    triples = [dict(zip(("head", "relation", "tail"), labels_of(index, t))) for t in test[:3]]
    response = client.post("/api/query", json={"triples": triples, "top_k": 3, "direction": "both"})
    assert response.status_code == 200
    expected = index.query(test[:3], top_k=3, direction="both")
    assert [r["proponents"] for r in response.json()["results"]] == [r.to_json()["proponents"] for r in expected]


def test_completion_facts_health_and_self_influence(served):
    index, client = served
    first = index.entity_labels[0]
    assert first in client.get("/api/entities", params={"prefix": first[:2]}).json()
    assert client.get("/api/relations").json() == list(index.relation_labels)
    facts = client.get("/api/facts", params={"entity": first}).json()
    assert facts["count"] == int(((index.hrt[:, 0] == 0) | (index.hrt[:, 2] == 0)).sum())
    assert all(first in (f["head"], f["tail"]) for f in facts["facts"])
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["training_triples"] == index.num_triples and health["scores"] == "exact"
    ranked = client.get("/api/self-influence", params={"top_k": 5}).json()
    assert [r["train_index"] for r in ranked] == [r.train_index for r in index.self_influence(5)]
    assert len(client.get("/api/test-triples").json()) > 0
    assert client.get("/docs").status_code == 200 and "tracin-index" in client.get("/").text


@pytest.mark.parametrize("request_args,status,words", [
    (("get", "/api/query", {"params": {"head": "usaa", "relation": "treaties", "tail": "uk"}}), 422, "closest known entities"),
    (("get", "/api/query", {"params": {"head": "usa", "relation": "treaties", "tail": "uk", "top_k": 0}}), 422, "top_k"),
    (("get", "/api/query", {"params": {"head": "usa", "relation": "treaties", "tail": "uk", "top_k": 100000}}), 422, "top_k"),
    (("get", "/api/query", {"params": {"head": "usa", "relation": "treaties", "tail": "uk", "direction": "up"}}), 422, "direction"),
    (("post", "/api/query", {"content": b"{not json", "headers": {"content-type": "application/json"}}), 422, "JSON"),
    (("post", "/api/query", {"json": {"triples": [{"head": "usa", "relation": "treaties", "tail": "uk"}] * (MAX_BATCH + 1)}}), 422, "at most"),
    (("post", "/api/query", {"content": b"x" * 70000, "headers": {"content-type": "application/json"}}), 413, "bytes"),
    (("get", "/api/facts", {"params": {"entity": "usaa"}}), 422, "closest known entities"),
    (("post", "/api/query", {"content": iter([b'{"triples": []}']), "headers": {"content-type": "application/json"}}), 411, "Content-Length"),
])  # fmt: skip
def test_bad_requests_get_a_4xx_and_one_line(served, request_args, status, words):
    _, client = served
    method, path, kwargs = request_args
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert words.lower() in message.lower() and "\n" not in message
    assert client.get("/api/health").status_code == 200  # still serving


def test_a_token_is_required_on_every_request_when_set(served):
    index, _ = served
    client = TestClient(create_app(index, token="s3cret"))
    assert client.get("/api/health").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/", params={"token": "s3cret"}).status_code == 200
