"""``tracin-index serve``: the index kept warm behind a JSON API, and an explorer in the browser.

One process holds the model, the checkpoints and the index in memory (:class:`~tracin_index.index.GradientIndex`)
and answers over HTTP (FastAPI on uvicorn; ``pip install -e '.[serve]'``):

- ``GET /api/query?head=&relation=&tail=&top_k=&direction=`` and ``POST /api/query`` (a batch): the
  JSON of ``query --output`` (``config`` and ``results``);
- ``GET /api/self-influence?top_k=``; ``GET /api/entities?prefix=`` and ``GET /api/relations`` (completion);
  ``GET /api/facts?entity=`` (an entity's training facts); ``GET /api/test-triples`` (the run's test file);
- ``GET /api/health``; OpenAPI docs at ``/docs``; the explorer at ``/`` (its HTML, JavaScript and CSS
  ship with the package: no CDN, works offline).

Bad requests get a 4xx and ``{"error": "one line"}`` (an unknown label with its closest matches, a
``top_k`` out of range, a batch too large, a body too large, malformed JSON); nothing crashes the
server. It binds to 127.0.0.1 unless told otherwise; ``token`` makes every request need
``Authorization: Bearer <token>`` (the explorer page takes it as ``/?token=...`` and sends the header).
No request names a file: the server reads only the index it was started with and its run directory.
Queries run one at a time (an opened index answers one call at a time); requests queue.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..errors import InputError, TracInError
from ..index import GradientIndex
from ..kg.triples import closest_labels, read_labeled_triples
from ..results import Triple
from ..storage.layout import resolve_path
from ..version import __version__
from .batcher import QueryBatcher

#: Largest top_k a request may ask for, test triples per POST, request body bytes, characters of a label.
MAX_TOP_K = 1000
MAX_BATCH = 64
MAX_BODY = 64 * 1024
MAX_LABEL = 1000
STATIC = Path(__file__).parent / "static"


# -- the JSON schema (the same as ``query --output``) -----------------------------------------------

class TripleIn(BaseModel):
    head: str = Field(min_length=1, max_length=MAX_LABEL)
    relation: str = Field(min_length=1, max_length=MAX_LABEL)
    tail: str = Field(min_length=1, max_length=MAX_LABEL)

class QueryRequest(BaseModel):
    triples: list[TripleIn] = Field(min_length=1)
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)
    direction: Literal["tail", "head", "both"] = "tail"

class InfluenceOut(BaseModel):
    train_index: int
    head: str
    relation: str
    tail: str
    influence: float

class TripleOut(BaseModel):
    head: str
    relation: str
    tail: str

class ResultOut(BaseModel):
    test_index: int | None
    test_triple: TripleOut
    num_proponents: int | None
    num_opponents: int | None
    counts_exact: bool
    proponents: list[InfluenceOut]
    opponents: list[InfluenceOut]

class QueryResponse(BaseModel):
    config: dict
    results: list[ResultOut]

class SelfInfluenceOut(BaseModel):
    train_index: int
    head: str
    relation: str
    tail: str
    self_influence: float




def create_app(index: GradientIndex, *, token: str | None = None, max_batch: int = MAX_BATCH, max_body: int = MAX_BODY,
               batching: bool = True):  # fmt: skip
    """The FastAPI application serving ``index``."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tracin-index", version=__version__,
                  description="Exact TracIn proponents and opponents of knowledge-graph predictions, from an index.")  # fmt: skip
    # every index call on one thread: queries run one at a time (as an opened index answers them anyway),
    # and their memory comes from one malloc arena (spread over the request threads, the
    # server's resident memory grows with every arena: benchmarks/serve_load.py records it)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracin-index")

    async def on_worker(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    # queries that arrive while one runs are answered together (serve/batcher.py), on the same thread
    batcher = QueryBatcher(worker, lambda ids, top_k, direction: index.query(ids, top_k=top_k, direction=direction),
                           batching=batching)  # fmt: skip
    app.state.batcher = batcher

    maps = index.id_maps()
    entities = sorted(index.entity_labels)
    lowered = [e.lower() for e in entities]
    relations = list(index.relation_labels)
    test_triples = _test_triples(index)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(line.strip() for line in message.splitlines())}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            sent = request.headers.get("authorization", "")
            given = sent[7:] if sent.lower().startswith("bearer ") else request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "a bearer token is required: send 'Authorization: Bearer <token>' (the explorer: /?token=...)")
        length = request.headers.get("content-length")
        if length is None and "chunked" in request.headers.get("transfer-encoding", "").lower():
            return error(411, "send the request body with a Content-Length (bodies are size-limited)")
        if length is not None and not (length.isascii() and length.isdigit()):  # "²" is a digit int() cannot read
            return error(400, "the Content-Length header must be a whole number of bytes")
        if length is not None and (len(length) > 18 or int(length) > max_body):  # int() refuses over 4,300 digits
            return error(413, f"request body over {max_body:,} bytes; send at most {max_batch} test triples per request")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(TracInError)
    async def input_error(request: Request, exc: TracInError):
        return error(422, next(iter(str(exc).splitlines()), type(exc).__name__))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the server stays up and says what happened
        return error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    async def run_query(triples: list[TripleIn], top_k: int, direction: str) -> dict:
        if len(triples) > max_batch:
            raise InputError(f"{len(triples)} test triples in one request; at most {max_batch}")
        ids = []
        for i, t in enumerate(triples):
            try:
                ids.append(maps.resolve_triple(t.head, t.relation, t.tail))
            except TracInError as exc:
                where = f"triples[{i}]" if len(triples) > 1 else "triple"
                raise InputError(str(exc).replace("--triple", where)) from None
        results = await asyncio.wrap_future(batcher.submit(ids, top_k, direction))
        config = {"command": "serve", "top_k": top_k, "scores": "exact", "loss": index.loss, "direction": direction,
                  "inverse_triples": index.inverse_triples, "parameters": index.manifest["selection"]}  # fmt: skip
        return {"config": config, "results": [r.to_json() for r in results]}

    @app.get("/api/query", response_model=QueryResponse, summary="Exact proponents and opponents of one triple")
    async def query_one(head: str = Query(..., min_length=1, max_length=MAX_LABEL),
                        relation: str = Query(..., min_length=1, max_length=MAX_LABEL),
                        tail: str = Query(..., min_length=1, max_length=MAX_LABEL), top_k: int = Query(10, ge=1, le=MAX_TOP_K),
                        direction: Literal["tail", "head", "both"] = "tail"):  # fmt: skip
        return await run_query([TripleIn(head=head, relation=relation, tail=tail)], top_k, direction)

    @app.post("/api/query", response_model=QueryResponse, summary="Exact proponents and opponents of a batch")
    async def query_batch(request: QueryRequest):
        return await run_query(request.triples, request.top_k, request.direction)

    @app.get("/api/self-influence", response_model=list[SelfInfluenceOut], summary="Training facts by self-influence")
    async def self_influence(top_k: int = Query(20, ge=1, le=MAX_TOP_K)):
        return [vars(r) for r in await on_worker(index.self_influence, top_k)]

    @app.get("/api/entities", response_model=list[str], summary="Entity labels starting with a prefix (completion)")
    def entity_labels(prefix: str = Query("", max_length=MAX_LABEL), limit: int = Query(20, ge=1, le=MAX_TOP_K)):
        p = prefix.lower()
        found = [e for e, low in zip(entities, lowered) if low.startswith(p)][:limit]
        if len(found) < limit and p:  # then labels containing it
            found += [e for e, low in zip(entities, lowered) if p in low and not low.startswith(p)][: limit - len(found)]
        return found

    @app.get("/api/relations", response_model=list[str], summary="Relation labels")
    def relation_labels():
        return relations

    @app.get("/api/facts", summary="Training facts with an entity as head or tail")
    def facts(entity: str = Query(..., min_length=1, max_length=MAX_LABEL), limit: int = Query(50, ge=1, le=MAX_TOP_K)):
        eid = maps.entity_to_id.get(entity)
        if eid is None:
            close = closest_labels(entity, maps.entity_to_id)  # as the command line suggests labels
            hint = f"closest known entities: {', '.join(repr(c) for c in close)}" if close else "no similar labels"
            raise InputError(f"unknown entity {entity!r}; {hint}")
        hrt = index.hrt
        rows = ((hrt[:, 0] == eid) | (hrt[:, 2] == eid)).nonzero()[0]
        labels = index.files.row_labels()
        return {"entity": entity, "count": int(len(rows)),
                "facts": [dict(zip(("train_index", "head", "relation", "tail"), (int(r), *labels[int(r)]))) for r in rows[:limit]]}  # fmt: skip

    @app.get("/api/test-triples", response_model=list[TripleOut], summary="The run's test triples (to pick from)")
    def tests(limit: int = Query(50, ge=1, le=MAX_TOP_K)):
        return [vars(t) for t in test_triples[:limit]]

    @app.get("/api/health", summary="The index, the model, sizes, and whether scores are exact")
    def health():
        manifest = index.manifest
        return {"status": "ok", "version": __version__, "index": index.directory.name,
                "model": manifest.get("replica", {}).get("model") if manifest.get("replica") else None,
                "training_triples": index.num_triples, "entities": len(entities), "relations": len(relations),
                "checkpoints": index.num_checkpoints, "loss": index.loss, "inverse_triples": index.inverse_triples,
                "parameters": manifest["selection"].get("parameters"), "scores": "exact",
                "index_bytes": sum(p.stat().st_size for p in index.directory.rglob("*") if p.is_file())}  # fmt: skip

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def explorer():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def _test_triples(index: GradientIndex) -> list[Triple]:
    """The test triples of the run the index was built from (its test.tsv), known labels only."""
    source = resolve_path(index.manifest["inputs"]["model"]["source"], index.directory)
    path = source / "test.tsv" if source.is_dir() else None
    if path is None or not path.is_file():
        return []
    try:
        rows = read_labeled_triples(path).labels.tolist()
    except InputError:
        return []
    known_e, known_r = set(index.entity_labels), set(index.relation_labels)
    return [Triple(*row) for row in rows if row[0] in known_e and row[2] in known_e and row[1] in known_r]


def serve(index_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          allow_pickle: bool = False, device: str | None = None, warn=print, batching: bool = True,
          max_memory: int | None = None, ready=None) -> None:  # fmt: skip
    """Open the index and serve it until interrupted; ``ready()`` is called once it is open, before serving."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise InputError("tracin-index serve needs FastAPI and uvicorn: pip install -e '.[serve]'")
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"warning: serving on {host}, reachable from other machines"
             + ("" if token else "; anyone who reaches it can query the index: consider --token"))  # fmt: skip
    index = GradientIndex.open(index_dir, device=device, allow_pickle=allow_pickle, pack=True,  # a server is kept busy
                               max_memory=max_memory)  # fmt: skip
    if index.passes is not None:
        warn(f"note: {index.passes.describe()}; each request reads the index (give a larger --max-memory to hold it)")
    index.run  # load the model now, not at the first request (and refuse changed files before serving)
    if ready is not None:
        ready()
    uvicorn.run(create_app(index, token=token, batching=batching), host=host, port=port, log_level="warning")
