"""Labelled triples and id maps: reading, writing, and label <-> id conversion.

The formats are PyKEEN's: triples are ``head<TAB>relation<TAB>tail`` lines, id maps are
``entity_to_id.tsv.gz`` / ``relation_to_id.tsv.gz`` (header ``id<TAB>label``); plain
``label<TAB>id`` maps are understood too. Every problem with the input is an :class:`InputError`
or a :class:`LabelError` whose one-line message names the file and line.
"""

from __future__ import annotations

import csv
import difflib
import gc
import gzip
import io
import itertools
import os
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..errors import InputError, LabelError, TracInWarning, shown
from ..words import counted

__all__ = [
    "IdMaps",
    "LabeledTriples",
    "make_id_maps",
    "read_id_map",
    "read_labeled_triples",
    "write_id_map",
    "write_labeled_triples",
]

PathLike = str | os.PathLike[str]

TRIPLES_FORMAT = "a TSV of head<TAB>relation<TAB>tail"
ID_MAP_FORMAT = "an id map: PyKEEN's id<TAB>label with header, or label<TAB>id"

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_BLANK_FIELD = re.compile(r"(?:^|[\t\n])[^\S\t\n]*[\t\n]")  # nothing but white space between two separators
# pykeen.triples.triples_factory.INVERSE_SUFFIX: PyKEEN sorts "r_inverse" right after "r".
_INVERSE_SUFFIX = "_inverse"
_COLUMNS = ("head", "relation", "tail")
_KINDS = ("head entity", "relation", "tail entity")


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no truth value to compare by
class LabeledTriples:
    """Labelled triples in file order, with the physical line each came from (for messages)."""

    labels: np.ndarray  # shape (n, 3), dtype object (str): head, relation, tail
    source: str  # the file path as given, or a short description such as "--triple"
    line_numbers: np.ndarray  # shape (n,), int64, 1-based

    def __post_init__(self) -> None:
        if self.labels.ndim != 2 or self.labels.shape[1] != 3:
            raise ValueError(f"labels must have shape (n, 3), got {self.labels.shape}")
        if self.line_numbers.shape != (self.labels.shape[0],):
            raise ValueError(
                f"line_numbers must have shape ({self.labels.shape[0]},), got {self.line_numbers.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[str]], source: str) -> LabeledTriples:
        """Triples given in code or on the command line; row i gets line number i (1-based)."""
        rows = [list(row) for row in rows]
        for number, row in enumerate(rows, start=1):
            if len(row) != 3:
                raise InputError(
                    f"{source}:{number}: expected 3 fields (head, relation, tail), found {len(row)}: {row!r}"
                )
            for column, label in zip(_COLUMNS, row):
                if not isinstance(label, str) or not label.strip():
                    raise InputError(
                        f"{source}:{number}: the {column} must be a non-empty string, got {label!r}"
                    )
        return cls(_label_array(rows), source, np.arange(1, len(rows) + 1, dtype=np.int64))


def read_labeled_triples(path: PathLike) -> LabeledTriples:
    """Read ``head<TAB>relation<TAB>tail`` lines (utf-8, plain or gzip); blank lines are skipped."""
    source = os.fspath(path)
    text = _read_text(path, TRIPLES_FORMAT)
    triples = _parse_triples(enumerate(text.split("\n"), start=1), source)
    if not len(triples):
        raise InputError(f"{source}: no triples (the file is empty or blank; expected {TRIPLES_FORMAT})")
    return triples


def iter_labeled_triples(path: PathLike, chunk_rows: int = 100_000) -> Iterator[LabeledTriples]:
    """The triples of a file in chunks of ``chunk_rows`` lines, streamed: memory of one chunk, not the file."""
    source = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{source}: is a directory (expected {TRIPLES_FORMAT})")
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    except FileNotFoundError:
        raise InputError(f"{source}: no such file (expected {TRIPLES_FORMAT})") from None
    except OSError as error:
        raise InputError(f"{source}: cannot read the file: {error.strerror or error}") from None
    opener = gzip.open if gzipped else open
    number = 0
    try:
        # binary lines end at b"\n" only, where read_labeled_triples ends them (a lone \r is not a line end);
        # each is decoded alone, so that a bad byte is named by its line and place, as there
        with opener(path, "rb") as file:
            while True:
                raw = list(itertools.islice(file, chunk_rows))
                if not raw:
                    return
                if number == 0 and raw[0].startswith(_UTF8_BOM):  # Windows editors prepend it
                    raw[0] = raw[0][len(_UTF8_BOM) :]
                lines = [(number + i, _decoded(line.rstrip(b"\n"), source, number + i)) for i, line in enumerate(raw, 1)]
                number += len(raw)
                chunk = _parse_triples(lines, source)
                if len(chunk):
                    yield chunk
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{source}: not readable ({error}); is it truncated?") from None


def _decoded(line: bytes, source: str, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{source}:{number}: not valid UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1} "
                         "of the line); save it as UTF-8") from None  # fmt: skip


def _parse_triples(numbered_lines: Iterable[tuple[int, str]], source: str) -> LabeledTriples:
    rows: list[list[str]] = []
    numbers: list[int] = []
    with _gc_paused():
        for number, line in numbered_lines:
            if line.endswith("\r"):
                line = line[:-1]
            fields = line.split("\t")
            if len(fields) == 3 and fields[0].strip() and fields[1].strip() and fields[2].strip() and "\r" not in line:
                rows.append(fields)
                numbers.append(number)
            elif line.strip():
                raise _malformed_triple(source, number, line, fields)
    return LabeledTriples(_label_array(rows), source, np.asarray(numbers, dtype=np.int64))


def write_labeled_triples(triples: LabeledTriples | np.ndarray, path: PathLike) -> None:
    """Write ``head<TAB>relation<TAB>tail`` lines; gzip (reproducible bytes) if the path ends in .gz."""
    labels = triples.labels if isinstance(triples, LabeledTriples) else np.asarray(triples, dtype=object)
    if labels.ndim != 2 or labels.shape[1] != 3:
        raise ValueError(f"triples must have shape (n, 3), got {labels.shape}")
    lines = [f"{head}\t{relation}\t{tail}\n" for head, relation, tail in labels.tolist()]
    text = "".join(lines)
    # A tab or line break inside a label would not read back as the same triple.
    if text.count("\t") != 2 * len(lines) or text.count("\n") != len(lines) or "\r" in text:
        row = next(i for i, line in enumerate(lines) if _breaks_tsv(line))
        raise InputError(
            f"{os.fspath(path)}: row {row} {shown(labels[row].tolist())} has a label with a tab or line break, "
            "which TSV cannot hold"
        )
    blank = _BLANK_FIELD.search(text)  # a reader skips a blank label's line or refuses it
    if blank:
        row = text.count("\n", 0, blank.start() + 1)  # a match that starts with a line break is on the next row
        raise InputError(f"{os.fspath(path)}: row {row} {shown(labels[row].tolist())} has an empty or blank label")
    if text.startswith("\ufeff"):  # else it reads as a byte order mark, and the first label loses it
        text = "\ufeff" + text
    _write_text(path, text)


def read_id_map(path: PathLike) -> dict[str, int]:
    """Read a label -> id map: PyKEEN's ``id<TAB>label`` file (with header) or ``label<TAB>id`` rows.

    Without a header line the id column is the one that is all integers; if both are (numeric
    labels) the file is ambiguous and must get a header. Ids must be exactly 0..n-1, as PyKEEN
    numbers them.
    """
    source = os.fspath(path)
    text = _read_text(path, ID_MAP_FORMAT)
    lines = list(_nonblank_lines(text))
    if not lines:
        raise InputError(f"{source}: the id map is empty (expected {ID_MAP_FORMAT})")
    header_number, header_line = lines[0]
    header = [field.strip().lower() for field in header_line.split("\t")]
    records: list[tuple[int, list[str]]]
    if header == ["id", "label"]:
        # PyKEEN writes this file with pandas, which quotes labels holding tabs, quotes or newlines.
        records = _csv_records(source, text, header_number)
        id_first: bool | None = True
    elif header == ["label", "id"]:
        records = [(number, line.split("\t")) for number, line in lines[1:]]
        id_first = False
    else:
        records = [(number, line.split("\t")) for number, line in lines]
        id_first = None
    if not records:
        raise InputError(f"{source}: the id map has a header but no entries")
    for number, fields in records:
        if len(fields) != 2:
            line = "\t".join(fields)
            raise InputError(
                f"{source}:{number}: expected 2 tab-separated fields (id, label or label, id), "
                f"found {len(fields)}: {line[:80]!r}"
            )
    if id_first is None:
        id_first = _detect_id_first(source, records)
    mapping = _parse_id_map(source, records, id_first, header_hint=header_number == records[0][0])
    _check_contiguous(mapping, source)
    return mapping


def write_id_map(mapping: Mapping[str, int], path: PathLike) -> None:
    """Write PyKEEN's format: header ``id<TAB>label``, rows sorted by id, quoted as pandas quotes them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows((index, label) for label, index in sorted(mapping.items(), key=lambda item: item[1]))
    _write_text(path, buffer.getvalue())


@dataclass(frozen=True)
class IdMaps:
    """PyKEEN's label -> id maps for entities and relations, and conversions both ways."""

    entity_to_id: Mapping[str, int]
    relation_to_id: Mapping[str, int]

    def __post_init__(self) -> None:
        _check_contiguous(self.entity_to_id, "entity_to_id")
        _check_contiguous(self.relation_to_id, "relation_to_id")

    @classmethod
    def from_files(cls, entity_to_id_path: PathLike, relation_to_id_path: PathLike) -> IdMaps:
        """Read both maps, e.g. a PyKEEN run's ``entity_to_id.tsv.gz`` and ``relation_to_id.tsv.gz``."""
        return cls(read_id_map(entity_to_id_path), read_id_map(relation_to_id_path))

    @classmethod
    def from_triples_factory(cls, tf: object) -> IdMaps:
        """Take the maps of a PyKEEN ``TriplesFactory`` (duck-typed, so pykeen is not imported here)."""
        return cls(dict(tf.entity_to_id), dict(tf.relation_to_id))  # type: ignore[attr-defined]

    @property
    def num_entities(self) -> int:
        return len(self.entity_to_id)

    @property
    def num_relations(self) -> int:
        return len(self.relation_to_id)

    @cached_property
    def id_to_entity(self) -> list[str]:
        return _invert(self.entity_to_id)

    @cached_property
    def id_to_relation(self) -> list[str]:
        return _invert(self.relation_to_id)

    @cached_property
    def _entity_labels(self) -> np.ndarray:
        return np.asarray(self.id_to_entity, dtype=object)

    @cached_property
    def _relation_labels(self) -> np.ndarray:
        return np.asarray(self.id_to_relation, dtype=object)

    def to_ids(self, triples: LabeledTriples) -> torch.LongTensor:
        """Map labels to ids, shape (n, 3); the first unknown label is a LabelError naming its line."""
        ids = np.empty((len(triples), 3), dtype=np.int64)
        for column in range(3):
            mapping = self._mapping(column)
            # One dict lookup per label, no sorting.
            ids[:, column] = [mapping.get(label, -1) for label in triples.labels[:, column].tolist()]
        unknown = np.argwhere(ids < 0)  # row-major: the first offending row, then its first column
        if len(unknown):
            row, column = (int(x) for x in unknown[0])
            where = f"{triples.source}:{int(triples.line_numbers[row])}"
            known = (ids[row] >= 0).any()
            if row == 0 and not known and _looks_like_header(triples.labels[row]):
                raise InputError(f"{where}: {' '.join(triples.labels[row])!r} looks like a header line; expected "
                                 f"{TRIPLES_FORMAT} from the first line on: remove the header")  # fmt: skip
            if not known and all(_ID.fullmatch(str(x).strip()) for x in triples.labels[row]):
                raise InputError(f"{where}: holds integer ids ({shown(' '.join(triples.labels[row]))}) where labels are "
                                 f"expected ({TRIPLES_FORMAT}): give the labelled triples (e.g. the run directory's "
                                 "train.tsv), or ids under PyKEEN's header line head<TAB>relation<TAB>tail, as in its "
                                 "numeric_triples.tsv.gz")  # fmt: skip
            raise self._unknown_label(where, column, triples.labels[row, column])
        return torch.from_numpy(ids)

    def read_ids(self, path: PathLike, chunk_rows: int = 100_000) -> torch.LongTensor:
        """Ids of a triples file, shape (n, 3), read in chunks: memory of the ids, not of the labels. The file
        holds labels, or is PyKEEN's ``numeric_triples.tsv.gz`` (see :meth:`read_ids_and_lines`)."""
        return self.read_ids_and_lines(path, chunk_rows)[0]

    def read_ids_and_lines(self, path: PathLike, chunk_rows: int = 100_000) -> tuple[torch.LongTensor, np.ndarray]:
        """The ids of :meth:`read_ids`, and the line (1-based) each triple is on.

        A file whose first line is PyKEEN's header ``head<TAB>relation<TAB>tail`` is the numeric triples file
        of ``TriplesFactory.to_path_binary`` (``training_triples/numeric_triples.tsv.gz`` of a
        ``save_to_directory`` folder): ids, row i being training index i, numbered by the id maps PyKEEN
        writes beside it, which must then be these.
        """
        head, relation, tail = NUMERIC_TRIPLES_HEADER
        known = head in self.entity_to_id and relation in self.relation_to_id and tail in self.entity_to_id
        numeric = not known and is_numeric_triples(path)  # known: a triple of these labels, not a header
        if numeric:
            self._check_numbered_alike(path)
        ids, lines = [], []
        for number, chunk in enumerate(iter_labeled_triples(path, chunk_rows)):
            if numeric and number == 0:  # without its header
                chunk = LabeledTriples(chunk.labels[1:], chunk.source, chunk.line_numbers[1:])
            ids.append(self._numeric_ids(chunk) if numeric else self.to_ids(chunk))
            lines.append(chunk.line_numbers)
        if not sum(len(chunk) for chunk in ids):
            raise InputError(f"{os.fspath(path)}: no triples (the file is empty or blank; expected {TRIPLES_FORMAT})")
        return torch.cat(ids), np.concatenate(lines)

    def _numeric_ids(self, triples: LabeledTriples) -> torch.LongTensor:
        """The ids of PyKEEN's numeric triples as written; each must be an id of these maps."""
        fields = triples.labels.ravel().tolist()
        if fields and not _IDS.fullmatch("\n".join(fields)):
            row = next(i for i, row in enumerate(triples.labels.tolist()) if not _IDS.fullmatch("\n".join(row)))
            raise InputError(f"{triples.source}:{int(triples.line_numbers[row])}: {shown(' '.join(triples.labels[row]))} "
                             f"is not a triple of ids, but line 1 ({triples.source}:1) is the header of PyKEEN's numeric "
                             "triples (head relation tail); a TSV of labels starts without a header: remove it")  # fmt: skip
        ids = np.asarray(fields, dtype=np.int64).reshape(-1, 3)
        bounds = np.array([self.num_entities, self.num_relations, self.num_entities])
        out_of_range = np.argwhere((ids < 0) | (ids >= bounds))
        if len(out_of_range):
            row, column = (int(x) for x in out_of_range[0])
            raise self._out_of_range(f"{triples.source}:{int(triples.line_numbers[row])}", column, int(ids[row, column]))
        return torch.from_numpy(ids)

    def _check_numbered_alike(self, path: PathLike) -> None:
        """Ids name the labels of the maps they were numbered by: PyKEEN writes those beside its numeric triples."""
        folder = os.path.dirname(os.fspath(path))
        for name, mapping in (("entity_to_id", self.entity_to_id), ("relation_to_id", self.relation_to_id)):
            beside = os.path.join(folder, f"{name}.tsv.gz")
            if os.path.isfile(beside) and read_id_map(beside) != dict(mapping):
                raise InputError(f"{os.fspath(path)}: its ids are numbered by {beside}, which is not the model's {name} "
                                 "map; give the model these triples were written with, or the triples as labels")  # fmt: skip

    def to_labels(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Map ids of shape (n, 3) to labels, an object array of str; ids out of range are a LabelError."""
        array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if array.ndim != 2 or array.shape[1] != 3:
            raise ValueError(f"ids must have shape (n, 3), got {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {array.dtype}")
        bounds = np.array([self.num_entities, self.num_relations, self.num_entities])
        out_of_range = np.argwhere((array < 0) | (array >= bounds))
        if len(out_of_range):
            row, column = (int(x) for x in out_of_range[0])
            raise self._out_of_range(f"row {row}", column, int(array[row, column]))
        labels = np.empty(array.shape, dtype=object)
        labels[:, 0] = self._entity_labels[array[:, 0]]
        labels[:, 1] = self._relation_labels[array[:, 1]]
        labels[:, 2] = self._entity_labels[array[:, 2]]
        return labels

    def resolve_triple(
        self, head: str | int, relation: str | int, tail: str | int, *, by_id: bool = False
    ) -> tuple[int, int, int]:
        """Resolve one triple given on the command line: labels, or with ``by_id`` integer ids."""
        where = "--triple"
        resolved: list[int] = []
        for column, value in enumerate((head, relation, tail)):
            if by_id:
                resolved.append(self._resolve_id(where, column, value))
                continue
            index = self._mapping(column).get(value)  # type: ignore[arg-type]
            if index is None:
                error = self._unknown_label(where, column, value)
                if self._are_ids((head, relation, tail)):
                    error = LabelError(f"{error}; {head} {relation} {tail} are valid ids: add --ids to give ids")
                raise error
            resolved.append(index)
        return resolved[0], resolved[1], resolved[2]

    def _are_ids(self, values: tuple) -> bool:
        """Whether each of (head, relation, tail) is an integer within its map's ids."""
        bounds = (self.num_entities, self.num_relations, self.num_entities)
        return all(isinstance(v, str) and _ID.fullmatch(v.strip()) and 0 <= int(v) < b for v, b in zip(values, bounds))

    def _mapping(self, column: int) -> Mapping[str, int]:
        return self.relation_to_id if column == 1 else self.entity_to_id

    def _resolve_id(self, where: str, column: int, value: str | int) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            index = int(value)
        elif isinstance(value, str) and _ID.fullmatch(value.strip()):
            index = int(value)
        else:
            raise LabelError(f"{where}: {_KINDS[column]} {shown(value)} is not an integer id (ids were asked for)")
        bound = self.num_relations if column == 1 else self.num_entities
        if not 0 <= index < bound:
            raise self._out_of_range(where, column, index)
        return index

    def _out_of_range(self, where: str, column: int, index: int) -> LabelError:
        kind = "relation" if column == 1 else "entity"
        bound = self.num_relations if column == 1 else self.num_entities
        valid = f"valid {kind} ids are 0..{bound - 1}" if bound else f"the {kind} map is empty"
        return LabelError(f"{where}: {_KINDS[column]} id {index} out of range; {valid}")

    def _unknown_label(self, where: str, column: int, label: object) -> LabelError:
        plural = "relations" if column == 1 else "entities"
        matches = closest_labels(str(label), self._mapping(column))
        if matches:
            hint = f"closest known {plural}: " + ", ".join(repr(match) for match in matches)
        else:
            hint = "no similar labels; see the id map"
        return LabelError(f"{where}: unknown {_KINDS[column]} {shown(label)}; {hint}")


_HEADER_WORDS = {"head", "relation", "tail", "h", "r", "t", "subject", "predicate", "object", "source", "target",
                 "label", "head_label", "relation_label", "tail_label", "head_id", "relation_id", "tail_id", "s", "p", "o"}


def _looks_like_header(row) -> bool:
    return all(str(x).strip().lower() in _HEADER_WORDS for x in row)


#: The first line of PyKEEN's numeric triples file (``pykeen.constants.COLUMN_LABELS``, as ``to_path_binary`` writes it).
NUMERIC_TRIPLES_HEADER = ("head", "relation", "tail")
_ID = re.compile(r"[+-]?0*[0-9]{1,18}")  # an integer that can be an id (int() refuses over 4,300 digits)
_IDS = re.compile(r"(?:[^\S\n]*[+-]?[0-9]{1,18}[^\S\n]*(?:\n|$))+")  # fields of integer ids, one a line


def is_numeric_triples(path: PathLike) -> bool:
    """Whether the file's first line is PyKEEN's numeric triples header: ids follow, not labels."""
    try:
        with closing(iter_labeled_triples(path, chunk_rows=1)) as chunks:
            first = next(chunks, None)
    except InputError:  # the reader of the labels names what is wrong
        return False
    return first is not None and int(first.line_numbers[0]) == 1 and tuple(first.labels[0].tolist()) == NUMERIC_TRIPLES_HEADER


def duplicate_rows(hrt: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows (0-based) that repeat an earlier row of the same triples."""
    array = hrt.numpy() if isinstance(hrt, torch.Tensor) else np.asarray(hrt)
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(array, axis=0, return_index=True)
    seen = np.zeros(len(array), dtype=bool)
    seen[first] = True
    return np.flatnonzero(~seen)


#: What a repeated training line means for an index or for exact TracIn (each line a row of its own).
REPEATS_IN_ROWS = ("PyKEEN trains on each distinct triple once per epoch, while every line here stays a row of its "
                   "own: a repeated triple is listed (and scores) once per line")
#: ... and for training (every line is a training instance).
REPEATS_IN_TRAINING = ("every line is trained on, so a repeated triple counts once per line in each epoch (and is a "
                       "row of its own in the run's train.tsv); remove the repeats if that is not meant")


def warn_duplicates(hrt: torch.Tensor | np.ndarray, source: str, line_numbers: np.ndarray | None = None,
                    meaning: str = REPEATS_IN_ROWS) -> int:  # fmt: skip
    """Warn (TracInWarning) when training triples repeat, saying what that means (``meaning``); returns how many
    rows repeat an earlier one."""
    repeats = duplicate_rows(hrt)
    if len(repeats):
        first = ", ".join(str(int(line_numbers[r]) if line_numbers is not None else int(r)) for r in repeats[:5])
        where = "lines" if line_numbers is not None else "rows (0-based train rows)"
        warnings.warn(
            f"{source}: {counted(len(repeats), 'training triple')} {'repeats' if len(repeats) == 1 else 'repeat'} an earlier line ({where} {first}"
            f"{', ...' if len(repeats) > 5 else ''}); {meaning}",
            TracInWarning, stacklevel=2,
        )
    return len(repeats)


def make_id_maps(triples: LabeledTriples | np.ndarray) -> IdMaps:
    """Number labels as ``TriplesFactory.from_labeled_triples`` does: sorted unique labels -> 0..n-1.

    Entities come from heads and tails; relations are sorted with ``r_inverse`` right after ``r``,
    as PyKEEN sorts them. Unlike PyKEEN's default, triples whose relation ends in ``_inverse`` are
    kept (PyKEEN drops them unless ``filter_out_candidate_inverse_relations=False``).
    """
    labels = triples.labels if isinstance(triples, LabeledTriples) else np.asarray(triples, dtype=object)
    entities = sorted(set(labels[:, 0].tolist()) | set(labels[:, 2].tolist()))
    relations = sorted(
        set(labels[:, 1].tolist()),
        key=lambda label: (label.removesuffix(_INVERSE_SUFFIX), label.endswith(_INVERSE_SUFFIX)),
    )
    return IdMaps(
        {str(label): index for index, label in enumerate(entities)},
        {str(label): index for index, label in enumerate(relations)},
    )


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of small lists trigger the cycle collector over and over (6x slower); none form cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_text(path: PathLike, expected: str) -> str:
    """The whole file as text: gzip detected by its magic bytes, utf-8 with an optional BOM."""
    source = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{source}: is a directory (expected {expected})")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise InputError(f"{source}: no such file (expected {expected})") from None
    except OSError as error:
        raise InputError(f"{source}: cannot read the file: {error.strerror or error}") from None
    # The magic bytes, not the suffix, decide: a plain file named .gz still reads.
    if data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{source}: not a readable gzip file ({error}); is it truncated?") from None
    if data.startswith(_UTF8_BOM):  # Windows editors prepend it; it is not part of the first label
        data = data[len(_UTF8_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise InputError(
            f"{source}:{line}: not valid UTF-8 "
            f"(byte 0x{data[error.start]:02x} at byte {column} of the line); "
            "save it as UTF-8"
        ) from None


def _write_text(path: PathLike, text: str) -> None:
    data = text.encode("utf-8")
    if os.fspath(path).endswith(".gz"):
        # mtime=0: same content, same bytes (checksums stay stable); level 6 as gzip(1): 9 is 6x slower
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with open(path, "wb") as file:
        file.write(data)


def _breaks_tsv(line: str) -> bool:
    return line.count("\t") != 2 or line.count("\n") != 1 or "\r" in line


def _label_array(rows: list[list[str]]) -> np.ndarray:
    labels = np.empty((len(rows), 3), dtype=object)  # np.array(rows) would guess a fixed-width dtype
    if rows:
        labels[:] = rows
    return labels


def _malformed_triple(source: str, number: int, line: str, fields: list[str]) -> InputError:
    if "\r" in line:  # PyKEEN (pandas) ends a line there, so it would not train on the triples read here
        return InputError(f"{source}:{number}: a carriage return inside the line ({line[:80]!r}): old Mac line ends? "
                          "Save the file with LF or CRLF line ends")  # fmt: skip
    prefix = f"{source}:{number}: expected 3 tab-separated fields (head, relation, tail)"
    if len(fields) != 3:
        return InputError(f"{prefix}, found {len(fields)}: {line[:80]!r}")
    empty = next(column for column, field in zip(_COLUMNS, fields) if not field.strip())
    return InputError(f"{prefix}, but the {empty} is empty: {line[:80]!r}")


def _nonblank_lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if line.strip():
            yield number, line


def _csv_records(source: str, text: str, header_number: int) -> list[tuple[int, list[str]]]:
    """Rows after the header, csv-unquoted, each with the physical line it starts on."""
    body = text.split("\n", header_number)[-1] if text.count("\n") >= header_number else ""
    reader = csv.reader(io.StringIO(body), delimiter="\t", strict=True)
    records: list[tuple[int, list[str]]] = []
    consumed = 0
    try:
        for fields in reader:
            start = header_number + consumed + 1
            consumed = reader.line_num
            if any(field.strip() for field in fields):
                records.append((start, fields))
    except csv.Error as error:
        line = header_number + reader.line_num
        raise InputError(f"{source}:{line}: badly quoted label ({error})") from None
    return records


def _detect_id_first(source: str, records: list[tuple[int, list[str]]]) -> bool:
    """Which column holds the ids, for a map without header: the one that is all integers."""
    first = sum(bool(_INTEGER.fullmatch(fields[0].strip())) for _, fields in records)
    second = sum(bool(_INTEGER.fullmatch(fields[1].strip())) for _, fields in records)
    if first == second == len(records):
        raise InputError(
            f"{source}: cannot tell the id column from the label column (both are integers); "
            "add a header line id<TAB>label (PyKEEN's order) or label<TAB>id"
        )
    # Neither all integers: guess the likelier column, so that parsing names the bad line.
    return first == len(records) or (second != len(records) and first > second)


def _parse_id_map(
    source: str, records: list[tuple[int, list[str]]], id_first: bool, *, header_hint: bool
) -> dict[str, int]:
    mapping: dict[str, int] = {}
    line_of_label: dict[str, int] = {}
    label_of_id: dict[int, tuple[str, int]] = {}
    for number, fields in records:
        raw_id, label = fields if id_first else reversed(fields)
        if not _INTEGER.fullmatch(raw_id.strip()):
            first_line = header_hint and number == records[0][0]
            hint = " (a header line must be id<TAB>label or label<TAB>id)" if first_line else ""
            raise InputError(f"{source}:{number}: id {shown(raw_id)} is not an integer{hint}")
        if not label.strip():
            raise InputError(f"{source}:{number}: empty label for id {shown(raw_id.strip())}")
        if len(raw_id.strip().lstrip("+-").lstrip("0")) > 18:  # no map holds 10**18 labels; int() refuses 4,300 digits
            raise InputError(f"{source}:{number}: id {shown(raw_id.strip(), 20)} is too large; ids must be 0..n-1, "
                             "as PyKEEN numbers them")  # fmt: skip
        index = int(raw_id)
        if label in mapping:
            raise InputError(
                f"{source}:{number}: duplicate label {shown(label)} "
                f"(already id {mapping[label]} at line {line_of_label[label]})"
            )
        if index in label_of_id:
            other, line = label_of_id[index]
            raise InputError(
                f"{source}:{number}: duplicate id {index} (already used by {shown(other)} at line {line})"
            )
        mapping[label] = index
        line_of_label[label] = number
        label_of_id[index] = (label, number)
    return mapping


def _check_contiguous(mapping: Mapping[str, int], source: str) -> None:
    """PyKEEN numbers labels 0..n-1; anything else cannot index an embedding table."""
    ids = set(mapping.values())
    expected = range(len(mapping))
    if len(ids) != len(mapping):
        raise InputError(
            f"{source}: two labels share an id; ids must be 0..{len(mapping) - 1}, one per label"
        )
    if ids != set(expected):
        missing = next(index for index in expected if index not in ids)
        raise InputError(
            f"{source}: ids must be 0..{len(mapping) - 1} without gaps, as PyKEEN numbers them; "
            f"id {missing} is missing (ids found: {min(ids)}..{max(ids)})"
        )


def _invert(mapping: Mapping[str, int]) -> list[str]:
    labels = [""] * len(mapping)
    for label, index in mapping.items():
        labels[index] = label
    return labels


def closest_labels(label: str, known: Mapping[str, int]) -> list[str]:
    """Up to three known labels like ``label``: same letters in another case first, then difflib's."""
    folded = label.casefold()
    same_but_case = [candidate for candidate in known if candidate.casefold() == folded]
    close = difflib.get_close_matches(label, list(known), n=3, cutoff=0.5)
    return list(dict.fromkeys(same_but_case + close))[:3]
