"""Typed influence results and their JSON, TSV and terminal forms (the same for ``exact`` and ``query``)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .errors import InputError, MachineError
from .files import disk_full, first_difference, out_of_space, write_json_atomic, write_text_atomic
from .words import counted

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


class JsonlResults:
    """A results file written as it goes (``.jsonl``): a first line ``{"config": ...}``, then one line per
    test triple, the ``results`` entries of the JSON output, appended a batch at a time.

    Opening an existing file resumes it: it must hold results of the same ``config`` (else it is refused,
    naming the first setting that differs), the test triples it holds are :attr:`done`, and a last line
    left incomplete by a killed run is cut off. Each batch is one ``write`` of whole lines, fsynced, so a
    killed run loses at most the batch in flight and never leaves a line half-written behind a complete one.
    """

    def __init__(self, path: Path, config: dict[str, Any], done: set[tuple]):
        self.path, self.config, self.done = path, config, done

    @staticmethod
    def key(result: dict[str, Any] | InfluenceResult) -> tuple:
        """What identifies a test triple's line: its row of the test file (None for --triple) and its labels."""
        if isinstance(result, InfluenceResult):
            result = result.to_json()
        t = result["test_triple"]
        return (result["test_index"], t["head"], t["relation"], t["tail"])

    @classmethod
    def open(cls, path: str | os.PathLike, config: dict[str, Any]) -> "JsonlResults":
        path = Path(path)
        header = json.loads(json.dumps({"config": config}))  # as it reads back (tuples become lists)
        if not path.exists() or path.stat().st_size == 0:
            write_text_atomic(path, json.dumps(header) + "\n", fsync=True)
            return cls(path, config, set())
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a last line without its newline was cut off mid-write
        done: set[tuple] = set()
        lines = complete.decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if number == 1:
                if not isinstance(record, dict) or set(record) != {"config"}:
                    raise InputError(f"{path}: not a results file of tracin-index (its first line is not a config); "
                                     "choose another --output, or delete it")  # fmt: skip
                difference = first_difference(record["config"], header["config"], "config", ("in the file", "now"))
                if difference:
                    raise InputError(f"{path}: holds results of other settings ({difference}); rerun with the same "
                                     "settings to resume it, or choose another --output")  # fmt: skip
                continue
            if not isinstance(record, dict) or "test_triple" not in record:
                raise InputError(f"{path}, line {number}: not a result line; the file is damaged: move it away and "
                                 "run again")  # fmt: skip
            done.add(cls.key(record))
        if not lines:
            raise InputError(f"{path}: not a results file of tracin-index (no config line); choose another --output, or delete it")
        if len(complete) < len(data):
            with open(path, "rb+") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        return cls(path, config, done)

    def append(self, results: Sequence[InfluenceResult]) -> None:
        """Add these test triples' lines in one write, fsynced; on a failed write the file is cut back to
        what it held before."""
        data = "".join(json.dumps(r.to_json()) + "\n" for r in results).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as error:
            os.ftruncate(fd, size)
            kept = f"the {counted(len(self.done), 'test triple')} before are kept: free space and run the same command to resume"
            free = out_of_space(error, self.path.parent)
            if free is not None:
                raise disk_full(self.path, free, kept) from None
            raise MachineError(f"{self.path}: could not write ({error.strerror}); {kept}") from None
        finally:
            os.close(fd)
        self.done.update(self.key(r) for r in results)


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
