"""Typed influence results and their JSON, TSV and terminal forms (the same for ``exact`` and ``query``)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    """Proponents (by descending influence) and opponents (ascending, most negative first) of one test triple."""

    test_index: int | None
    test_triple: Triple
    proponents: tuple[Influence, ...]
    opponents: tuple[Influence, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "test_index": self.test_index,
            "test_triple": asdict(self.test_triple),
            "proponents": [asdict(p) for p in self.proponents],
            "opponents": [asdict(o) for o in self.opponents],
        }


def top_influences(
    scores: torch.Tensor, top_k: int, labels: Sequence[tuple[str, str, str]], train_indices: torch.Tensor | None = None
) -> tuple[tuple[Influence, ...], tuple[Influence, ...]]:
    """Proponents (k largest scores) and opponents (k smallest) from one row of scores.

    ``labels[i]`` labels training row ``i``; ``train_indices`` maps score positions to training rows
    when the scores cover a subset.
    """
    k = min(top_k, scores.numel())

    def make(values: torch.Tensor, positions: torch.Tensor) -> tuple[Influence, ...]:
        rows = positions if train_indices is None else train_indices[positions]
        return tuple(
            Influence(int(row), *labels[int(row)], influence=float(value))
            for row, value in zip(rows.tolist(), values.tolist())
        )

    top = torch.topk(scores, k, largest=True, sorted=True)
    bottom = torch.topk(scores, k, largest=False, sorted=True)
    return make(top.values, top.indices), make(bottom.values, bottom.indices)


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
    """Rich tables: one per test triple, proponents then opponents."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for r in results:
        t = r.test_triple
        where = f"test triple {r.test_index}: " if r.test_index is not None else ""
        for kind, items, style in (("Proponents", r.proponents, "green"), ("Opponents", r.opponents, "red")):
            table = Table(title=f"{kind} of {where}({t.head}, {t.relation}, {t.tail})", title_justify="left")
            table.add_column("#", justify="right")
            table.add_column("train row", justify="right")
            table.add_column("head")
            table.add_column("relation")
            table.add_column("tail")
            table.add_column("influence", justify="right", style=style)
            for rank, i in enumerate(items, start=1):
                table.add_row(str(rank), str(i.train_index), i.head, i.relation, i.tail, f"{i.influence:.4g}")
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
