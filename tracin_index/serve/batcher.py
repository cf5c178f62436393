"""Micro-batching: queries that arrive while one runs are answered together in the next.

The server answers on one thread (the index answers one call at a time). Each request is queued with its
test triples and settings; the first request to find no batch scheduled schedules one on that thread, and
the batch takes every request queued by the time it starts: those with the same ``top_k`` and
``direction`` go to the index in one query call (the batched scan reads the stored arrays once for
all of them), and each request gets its own results back. A request whose merged call fails is
answered alone, so one bad request cannot fail the others.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from typing import Callable, Sequence

from ..results import InfluenceResult

Answer = Callable[[list, int, str], list[InfluenceResult]]  # (id triples, top_k, direction) -> results


class QueryBatcher:
    """Queues queries and answers them in batches on ``executor`` (a single thread) with ``answer``.
    ``batching=False``: each request in a call of its own (what the benchmark compares against)."""

    def __init__(self, executor: Executor, answer: Answer, *, batching: bool = True):
        self.executor, self.answer, self.batching = executor, answer, batching
        self._lock = threading.Lock()
        self._pending: list[tuple[list, int, str, Future]] = []
        self._scheduled = False
        #: per batch run: how many requests it answered (the tests and the benchmark read it)
        self.batch_sizes: list[int] = []

    def submit(self, ids: Sequence, top_k: int, direction: str) -> Future:
        """The results of one request, when its batch has run."""
        future: Future = Future()
        with self._lock:
            self._pending.append((list(ids), top_k, direction, future))
            if not self._scheduled:
                self._scheduled = True
                self.executor.submit(self._run)
        return future

    def _run(self) -> None:
        with self._lock:
            requests, self._pending, self._scheduled = self._pending, [], False
        self.batch_sizes.append(len(requests))
        groups: dict[tuple[int, str], list[tuple[list, int, str, Future]]] = {}
        for request in requests:
            groups.setdefault((request[1], request[2]) if self.batching else (id(request), ""), []).append(request)
        for group in groups.values():
            self._answer_group(group)

    def _answer_group(self, group: list[tuple[list, int, str, Future]]) -> None:
        if len(group) > 1:
            try:
                results = self.answer([t for ids, *_ in group for t in ids], group[0][1], group[0][2])
            except Exception:  # answered one by one below: each request gets its own result or error
                results = None
            if results is not None:
                start = 0
                for ids, _, _, future in group:
                    future.set_result(results[start : start + len(ids)])
                    start += len(ids)
                return
        for ids, top_k, direction, future in group:
            try:
                future.set_result(self.answer(ids, top_k, direction))
            except StopIteration as error:  # a future cannot hold one (its waiter would hang): a bug, named
                future.set_exception(RuntimeError(f"the query raised StopIteration: {error!r}"))
            except Exception as error:  # noqa: BLE001 (handed to the request that caused it)
                future.set_exception(error)
