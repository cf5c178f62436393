r"""Settling a query: from certain bounds on every training triple to the exact top k, rescoring few.

With :math:`|\mathrm{influence}(z, q) - \hat I(z, q)| \le \epsilon(z, q)` for every training triple z
(:mod:`tracin_index.search.scan`), the k-th largest lower bound :math:`L_k` is a lower bound of the k-th
largest influence, so only rows whose upper bound reaches :math:`L_k` (and 0) can be among the top-k
proponents; likewise for opponents. Those *candidates* are refined (:mod:`tracin_index.search.refine`)
and rescored exactly in rounds, the most promising first, until no row left unscored can still enter
either top k (a threshold algorithm): every listed influence is exact TracIn and the lists are the
exact top k, without a fixed rerank depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import numpy as np
import torch

from ..results import Influence, InfluenceResult, ranked_rows

#: Rows rescored exactly in the first round of a query; each further round takes twice as many, up to
#: MAX_ROUND: small rounds stop soon after the k-th lower bound has risen enough, large ones keep the
#: overhead per row down.
FIRST_ROUND = 64
MAX_ROUND = 2048
#: Rows refined in the first round (where refining applies); each further round twice as many.
FIRST_REFINE_ROUND = 64
#: Refine only when the scan leaves more candidates than this (else rescore them directly, in rounds):
#: refining a row costs a fraction of rescoring it, so only a pool about one exact round's size is
#: rescored directly.
REFINE_MIN_CANDIDATES = 64
#: A row's state while settling: bounds from the scan, refined bounds, exact score.
_SCANNED, _REFINED, _EXACT = 0, 1, 2


def candidates(low: torch.Tensor, high: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that may be top-k proponents and rows that may be top-k opponents, from bounds on every row.

    The k-th largest lower bound is at most the k-th largest influence, so a row can be a top-k
    proponent only if its upper bound reaches it and exceeds 0; opponents mirrored.
    """
    n = min(k, len(low))
    kth_low = kth_largest(low, n) if n else 0.0
    kth_high = -kth_largest(-high, n) if n else 0.0
    # (high >= t) & (high > 0) with t = max(kth_low, 0): one comparison over every row, not three
    pro = torch.nonzero(high >= kth_low if kth_low > 0 else high > 0).view(-1).numpy()
    opp = torch.nonzero(low <= kth_high if kth_high < 0 else low < 0).view(-1).numpy()
    return pro, opp


#: Rows per chunk of :func:`kth_largest`.
KTH_CHUNK = 1024


def kth_largest(x: torch.Tensor, k: int) -> float:
    """The k-th largest of ``x`` (1 <= k <= len(x)), exactly: from the k chunks of :data:`KTH_CHUNK` rows
    with the largest maxima and the rows after the last whole chunk (a chunk holds one of the k largest only if its maximum is at least the k-th
    largest, and at most k chunks' are), a fifth of torch.topk's time over 1M rows."""
    if len(x) <= 4 * k * KTH_CHUNK:
        return float(torch.topk(x, k).values[-1])
    whole = len(x) // KTH_CHUNK * KTH_CHUNK
    chunks, tail = x[:whole].view(-1, KTH_CHUNK), x[whole:]  # (no copy: the tail is a chunk of its own)
    best = torch.topk(chunks.amax(1), k).indices
    kept = chunks[best].reshape(-1)
    return float(torch.topk(torch.cat([kept, tail]) if len(tail) else kept, k).values[-1])


def best_estimates(value: torch.Tensor, fixed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``fixed`` best estimates each way (of their sign): a fixed rescoring depth (``--candidates``)."""
    n = min(fixed, len(value))
    pro = torch.topk(value, n).indices.numpy()
    opp = torch.topk(-value, n).indices.numpy()
    return pro[value[pro].numpy() > 0], opp[value[opp].numpy() < 0]


def most_promising(pro: np.ndarray, opp: np.ndarray, low: torch.Tensor, high: torch.Tensor, step: int) -> np.ndarray:
    """At most ``step // 2`` rows each way: the highest upper bounds of ``pro``, the lowest lower bounds of ``opp``."""
    half = max(1, step // 2)
    if len(pro) > half:
        pro = pro[torch.topk(high[torch.as_tensor(pro)], half).indices.numpy()]
    if len(opp) > half:
        opp = opp[torch.topk(-low[torch.as_tensor(opp)], half).indices.numpy()]
    return np.union1d(pro, opp)


@dataclass
class Settled:
    """What settling one test triple did: the rows rescored exactly and their exact scores, in how many
    rounds (refining or rescoring), and how many rows were refined first."""

    rows: np.ndarray
    scores: np.ndarray
    rounds: int
    refined: int


def settling(low: torch.Tensor, high: torch.Tensor, k: int, refinable: bool) -> Generator[tuple[str, np.ndarray], object, Settled]:
    """The rounds that settle one test triple's top k, as requests: yields ``("refine", rows)`` (to be sent
    back the rows' refined ``(value, error)``) and ``("rescore", rows)`` (their exact scores), and returns
    the :class:`Settled`; so that a batch of test triples can answer their requests together.

    Rescore candidates exactly in rounds, the most promising first (the highest upper bounds for
    proponents, the lowest lower bounds for opponents), until no row left unscored can still enter
    either top k: each round's exact scores raise the k-th lower bound towards the k-th influence and
    rule out more of the rest. The first round takes at most :data:`FIRST_ROUND` rows, each next one
    twice as many (up to :data:`MAX_ROUND`).

    ``refinable`` (where the index's plans allow it): candidates are first refined in such rounds, which
    leaves only float16 rounding in their bounds; most then drop out, and only the refined rows that can
    still enter a top k are rescored exactly.

    Updates ``low``/``high`` in place (exact where scored).
    """
    state = torch.zeros(len(low), dtype=torch.int8)  # _SCANNED, _REFINED or _EXACT
    pool = None
    rows_parts, score_parts = [], []
    steps, rounds = {_SCANNED: FIRST_REFINE_ROUND, _REFINED: FIRST_ROUND}, 0
    refined = 0
    refining = refinable
    # bounds only tighten and the k-th lower bound only rises, so a row ruled out stays out: after the
    # first pass over every row, later rounds look at the first candidates only (over fewer rows the
    # k-th lower bound can only be lower, which keeps more candidates, never fewer)
    while True:
        if pool is None:
            pro, opp = candidates(low, high, k)
            pool = torch.as_tensor(np.union1d(pro, opp), dtype=torch.long)
            # few candidates: rescoring them directly costs less than refining first (more rounds, more calls)
            refining = refining and len(pool) > REFINE_MIN_CANDIDATES
        else:
            pro, opp = (pool.numpy()[rows] for rows in candidates(low[pool], high[pool], k))
        pro, opp = pro[state[pro].numpy() != _EXACT], opp[state[opp].numpy() != _EXACT]
        if len(pro) + len(opp) == 0:
            break
        stage = _REFINED
        if refining:
            coarse_pro, coarse_opp = pro[state[pro].numpy() == _SCANNED], opp[state[opp].numpy() == _SCANNED]
            if len(coarse_pro) + len(coarse_opp):
                stage, pro, opp = _SCANNED, coarse_pro, coarse_opp
        rows = most_promising(pro, opp, low, high, steps[stage])
        steps[stage] = min(2 * steps[stage], MAX_ROUND)
        where = torch.as_tensor(rows)
        if stage == _SCANNED and refining:
            value, error = yield ("refine", rows)
            low[where] = torch.maximum(low[where], value - error)
            high[where] = torch.minimum(high[where], value + error)
            state[where] = _REFINED
            refined += len(rows)
            rounds += 1
            continue
        exact = yield ("rescore", rows)
        low[where] = high[where] = exact
        state[where] = _EXACT
        rows_parts.append(rows)
        score_parts.append(exact.numpy())
        rounds += 1
    if not rows_parts:
        return Settled(np.zeros(0, dtype=np.int64), np.zeros(0), 0, refined)
    return Settled(np.concatenate(rows_parts), np.concatenate(score_parts), rounds, refined)


def counted_result(index, triple, scores: np.ndarray, rows: np.ndarray, top_k: int, labels, low: torch.Tensor,
                   high: torch.Tensor, exact_rows: np.ndarray | None, base: dict | None = None) -> InfluenceResult:  # fmt: skip
    """The result from scores of ``rows``; counts of each sign from exact scores where known, else
    from the estimates (the bounds say when every sign is certain). ``base``: a sharded query's
    counts over all rows from the scan, corrected here for its candidates."""

    def make(sign: int) -> tuple[Influence, ...]:
        return tuple(Influence(int(rows[p]), *labels[int(rows[p])], influence=float(scores[p]))
                     for p in ranked_rows(scores, rows, top_k, sign))  # fmt: skip

    low, high = low.numpy(), high.numpy()
    estimate = (low + high) / 2
    unsettled = (low < 0) & (high > 0)
    if exact_rows is not None:
        estimate[exact_rows] = scores
        unsettled[exact_rows] = False
    if base is not None:
        cand = base["rows"]
        before = (base["low"] + base["high"]) / 2
        positive = base["positive"] - int((before > 0).sum()) + int((estimate[cand] > 0).sum())
        negative = base["negative"] - int((before < 0).sum()) + int((estimate[cand] < 0).sum())
        open_signs = base["open_signs"] - int(((base["low"] < 0) & (base["high"] > 0)).sum()) + int(unsettled[cand].sum())
        return InfluenceResult(index, triple, make(+1), make(-1), positive, negative, counts_exact=open_signs == 0)
    return InfluenceResult(index, triple, make(+1), make(-1), int((estimate > 0).sum()), int((estimate < 0).sum()),
                           counts_exact=not bool(unsettled.any()))  # fmt: skip
