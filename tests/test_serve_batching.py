"""Micro-batching in the server: requests that arrive while a query runs are answered together, each
with the answer it gets alone; one bad request fails only itself."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_index import run_ids

from tracin_index.errors import InputError
from tracin_index.index import GradientIndex
from tracin_index.serve.batcher import QueryBatcher


@pytest.fixture(scope="module")
def index(tiny_run, tmp_path_factory):
    return GradientIndex.build(tmp_path_factory.mktemp("batching") / "index", model_path=tiny_run, sketch_dim=16, device="cpu")


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.test_triple == b.test_triple
        for x, y in ((a.proponents, b.proponents), (a.opponents, b.opponents)):
            assert [i.train_index for i in x] == [i.train_index for i in y]
            assert [i.influence for i in x] == pytest.approx([i.influence for i in y], rel=1e-5)


def held_batcher(index):
    """A batcher whose thread is held busy until released: what arrives meanwhile is queued together."""
    calls = []

    def answer(ids, top_k, direction):
        calls.append((len(ids), top_k, direction))
        return index.query(ids, top_k=top_k, direction=direction)

    worker = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    worker.submit(release.wait)  # the thread is busy with an earlier query
    return QueryBatcher(worker, answer), calls, release


def test_queued_requests_with_the_same_settings_share_one_query_call(index, tiny_run):
    _, _, test = run_ids(tiny_run)
    batcher, calls, release = held_batcher(index)
    a = batcher.submit(test[0:1].tolist(), 5, "tail")
    b = batcher.submit(test[1:4].tolist(), 5, "tail")
    c = batcher.submit(test[4:5].tolist(), 3, "tail")
    release.set()
    results = [f.result(timeout=120) for f in (a, b, c)]
    assert sorted(calls) == [(1, 3, "tail"), (4, 5, "tail")]  # a and b in one call; c (other top_k) apart
    assert batcher.batch_sizes == [3]
    assert_same(results[0], index.query(test[0:1], top_k=5))
    assert_same(results[1], [index.query(test[i : i + 1], top_k=5)[0] for i in range(1, 4)])
    assert_same(results[2], index.query(test[4:5], top_k=3))


def test_a_bad_request_in_a_batch_fails_alone(index, tiny_run):
    _, _, test = run_ids(tiny_run)
    batcher, calls, release = held_batcher(index)
    good = batcher.submit(test[0:2].tolist(), 5, "tail")
    bad = batcher.submit([[10**6, 0, 0]], 5, "tail")
    release.set()
    assert_same(good.result(timeout=120), index.query(test[0:2], top_k=5))
    with pytest.raises(InputError, match="out of range"):
        bad.result(timeout=120)


def test_concurrent_http_requests_are_batched_and_answered_as_alone(index, tiny_run):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    httpx = pytest.importorskip("httpx", reason="httpx is not installed")
    from tracin_index.serve.app import create_app

    _, _, test = run_ids(tiny_run)
    app = create_app(index)
    labels = [(index.entity_labels[h], index.relation_labels[r], index.entity_labels[t]) for h, r, t in test[:8].tolist()]

    async def ask_all():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(client.get("/api/query", params={"head": h, "relation": r, "tail": t, "top_k": 5})
                                          for h, r, t in labels))  # fmt: skip

    responses = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in responses)
    assert max(app.state.batcher.batch_sizes) > 1 and sum(app.state.batcher.batch_sizes) == 8
    for response, ids in zip(responses, test[:8]):
        (got,) = response.json()["results"]
        (alone,) = [r.to_json() for r in index.query(ids[None], top_k=5)]
        for kind in ("proponents", "opponents"):
            assert [i["train_index"] for i in got[kind]] == [i["train_index"] for i in alone[kind]]
            assert [i["influence"] for i in got[kind]] == pytest.approx([i["influence"] for i in alone[kind]], rel=1e-5)


def test_a_query_that_raises_stop_iteration_fails_its_request_instead_of_hanging_it():
    def answer(ids, top_k, direction):
        raise StopIteration  # what a generator's bug raises through: a Future cannot hold it

    batcher = QueryBatcher(ThreadPoolExecutor(max_workers=1), answer)
    with pytest.raises(RuntimeError, match="StopIteration"):
        batcher.submit([[0, 0, 0]], 5, "tail").result(timeout=30)
