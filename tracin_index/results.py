"""Typed influence results and their JSON, TSV and terminal forms (the same for ``exact`` and ``query``)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .files import write_json_atomic, write_text_atomic

RESULT_FIELDS = ("test_index", "test_head", "test_relation", "test_tail", "kind", "rank", "train_index", "head",
                 "relation", "tail", "influence")


@dataclass(frozen=True)
class Triple:
    head: str
    relation: str
    tail: str


@dataclass(frozen=True)
class Influence:
    """One training triple and its influence on a test triple."""

    train_index: int  # 0-based row in the training file as given
    head: str
    relation: str
    tail: str
    influence: float


@dataclass(frozen=True)
class InfluenceResult:
    """Proponents (by descending influence) and opponents (ascending, most negative first) of one test triple.

    Only influences of the list's sign are listed: an empty list is an answer. ``num_proponents`` /
    ``num_opponents``: how many training triples have a positive / negative influence; exact when
    ``counts_exact``, else counted from an index's estimates where their signs are not certain.
    Equal influences are listed by training row.
    """

    test_index: int | None
    test_triple: Triple
    proponents: tuple[Influence, ...]
    opponents: tuple[Influence, ...]
    num_proponents: int | None = None
    num_opponents: int | None = None
    counts_exact: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "test_index": self.test_index,
            "test_triple": asdict(self.test_triple),
            "num_proponents": self.num_proponents,
            "num_opponents": self.num_opponents,
            "counts_exact": self.counts_exact,
            "proponents": [asdict(p) for p in self.proponents],
            "opponents": [asdict(o) for o in self.opponents],
        }


@dataclass(frozen=True)
class SelfInfluence:
    """A training triple and its self-influence sum_c lr_c ||g(z; theta_c)||^2."""

    train_index: int
    head: str
    relation: str
    tail: str
    self_influence: float


def rank_self_influence(scores: np.ndarray, labels, top_k: int | None) -> list[SelfInfluence]:
    """Training triples by descending self-influence (equal scores by training row); ``labels[row]``
    labels training row ``row``; ``top_k`` None: all."""
    order = np.lexsort((np.arange(len(scores)), -scores))[: top_k or len(scores)]
    return [SelfInfluence(int(r), *labels[int(r)], float(scores[r])) for r in order]


def ranked_rows(scores: np.ndarray, rows: np.ndarray, k: int, sign: int) -> np.ndarray:
    """Positions of the (at most) k scores of ``sign`` (+1: largest positive, -1: most negative), best
    first, equal scores by ascending row; scores of the other sign or zero are never taken."""
    signed = scores * sign
    positions = np.flatnonzero(signed > 0)
    if len(positions) > k:
        kth = -np.partition(-signed[positions], k - 1)[k - 1]
        positions = positions[signed[positions] >= kth]  # every tie at the boundary, then the smallest rows
    order = np.lexsort((rows[positions], -signed[positions]))[:k]
    return positions[order]


def top_influences(
    scores: torch.Tensor | np.ndarray,
    top_k: int,
    labels: Sequence[tuple[str, str, str]],
    train_indices: torch.Tensor | np.ndarray | None = None,
) -> tuple[tuple[Influence, ...], tuple[Influence, ...]]:
    """Proponents (the k largest positive scores) and opponents (the k most negative) from one row of scores.

    ``labels[i]`` labels training row ``i``; ``train_indices`` maps score positions to training rows
    when the scores cover a subset. Ties go by ascending training row, so that ``exact`` and ``query``
    list equal influences alike.
    """
    scores = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores, np.float64)
    if train_indices is None:
        rows = np.arange(len(scores))
    else:
        rows = train_indices.cpu().numpy() if torch.is_tensor(train_indices) else np.asarray(train_indices)
    rows = rows.astype(np.int64)

    def make(sign: int) -> tuple[Influence, ...]:
        return tuple(
            Influence(int(rows[p]), *labels[int(rows[p])], influence=float(scores[p])) for p in ranked_rows(scores, rows, top_k, sign)
        )

    return make(+1), make(-1)


def sign_counts(scores: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """How many scores are positive and how many negative."""
    scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    return int((scores > 0).sum()), int((scores < 0).sum())


def results_to_json(results: Iterable[InfluenceResult], config: dict[str, Any]) -> dict[str, Any]:
    return {"config": config, "results": [r.to_json() for r in results]}


def write_results(path: str | os.PathLike, results: Sequence[InfluenceResult], config: dict[str, Any]) -> None:
    """JSON (``.json``) or TSV (``.tsv``), written whole or not at all."""
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        write_text_atomic(path, results_to_tsv(results))
    else:
        write_json_atomic(path, results_to_json(results, config))


def results_to_tsv(results: Sequence[InfluenceResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(RESULT_FIELDS)
    for r in results:
        t = r.test_triple
        for kind, items in (("proponent", r.proponents), ("opponent", r.opponents)):
            for rank, i in enumerate(items, start=1):
                writer.writerow(
                    [r.test_index, t.head, t.relation, t.tail, kind, rank, i.train_index, i.head, i.relation, i.tail,
                     repr(i.influence)]
                )
    return buffer.getvalue()


def render(results: Sequence[InfluenceResult], console=None) -> None:
    """Rich tables: one per test triple, proponents then opponents. Labels are printed as written (as
    :class:`~rich.text.Text`, never read as markup), whatever the console's settings."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    for r in results:
        t = r.test_triple
        where = f"test triple {r.test_index}: " if r.test_index is not None else ""
        lists = (("Proponents", "positive", r.proponents, r.num_proponents, "green"),
                 ("Opponents", "negative", r.opponents, r.num_opponents, "red"))  # fmt: skip
        for kind, sign, items, count, style in lists:
            of = f"{kind} of {where}({t.head}, {t.relation}, {t.tail})"
            if not items:
                console.print(Text(f"{of}: no training triple has a {sign} influence"))
                continue
            if count is not None:
                of += f": {len(items)} of {'' if r.counts_exact else 'about '}{count:,} with a {sign} influence"
            table = Table(title=Text(of), title_justify="left")
            table.add_column("#", justify="right")
            table.add_column("train row", justify="right")
            table.add_column("head")
            table.add_column("relation")
            table.add_column("tail")
            table.add_column("influence", justify="right", style=style)
            for rank, i in enumerate(items, start=1):
                table.add_row(str(rank), str(i.train_index), Text(i.head), Text(i.relation), Text(i.tail), f"{i.influence:.4g}")
            console.print(table)


def write_self_influence(path: str | os.PathLike, ranked: Sequence[Any]) -> None:
    """Self-influence ranking as TSV (``.tsv``) or JSON, written whole or not at all."""
    path = Path(path)
    fields = ("train_index", "head", "relation", "tail", "self_influence")
    if path.suffix.lower() == ".tsv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(("rank",) + fields)
        for rank, item in enumerate(ranked, start=1):
            writer.writerow([rank] + [getattr(item, f) for f in fields])
        write_text_atomic(path, buffer.getvalue())
    else:
        write_json_atomic(path, [asdict(item) for item in ranked])
