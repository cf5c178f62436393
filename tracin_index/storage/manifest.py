"""What an index's ``manifest.json`` holds, checked when it is read: every key a reader relies on, of its type
and range, so that a damaged or hand-edited manifest is refused in one line naming the key (never a
``KeyError`` or a ``TypeError`` in the middle of a query, nor an allocation sized by a wrong number).

:func:`check_manifest` checks each value on its own; :class:`~tracin_index.storage.reader.IndexFiles` checks
what the values must agree on with the index's files (rows, shards, the model's sizes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, shown

#: Counts and indices: numbers of rows, ids, sizes (int64, as numpy and torch hold them).
MAX_COUNT = 2**63 - 1

Check = Callable[[Any], str | None]  # the value -> what it should have been, or None where it is fine


def _integer(low: int) -> Check:
    def check(value: Any) -> str | None:
        fine = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT
        return None if fine else f"a whole number from {low} to {MAX_COUNT:,}"

    return check


count, positive = _integer(0), _integer(1)


def integer(value: Any) -> str | None:
    fine = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_COUNT
    return None if fine else "a whole number"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def rate(value: Any) -> str | None:
    fine = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if fine else "a finite number, not negative"


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if any(type(value) is type(c) and value == c for c in choices) else f"one of {', '.join(map(repr, choices))}"

    return check


def optional(inner: Any) -> tuple:
    return (None, inner)


class Each:
    """A JSON object of any keys (strings), each value of ``shape``."""

    def __init__(self, shape: Any):
        self.shape = shape


#: The manifest as readers use it (tracin_index.build.builder writes it): a dict is an object with those keys
#: (a key ending in "?" may be missing), a one-element list a list of such elements, a tuple any of its shapes.
PLAN = {"name": text, "kind": one_of("factored", "dense", "rows", "opaque"), "sizes": [count], "sketch": [count],
        "grouped": flag, "derived": optional([(text, count)]), "examples": positive}  # fmt: skip
CONVE_SHAPE = {key: positive for key in ("embedding_dim", "input_channels", "image_height", "image_width",
                                         "output_channels", "kernel_height", "kernel_width")}  # fmt: skip
REPLICA = ({"model": one_of("ConvE"), "num_entities": count, "num_relations": count, "shape": CONVE_SHAPE, "batch_norm": flag,
            "inverse_triples?": flag},
           {"model": one_of("DistMult"), "num_entities": count, "num_relations": count, "dim": positive,
            "inverse_triples?": flag})  # fmt: skip
MANIFEST = {
    "inputs": {
        "model": {"source": text, "pickled": flag, "files": Each(text)},
        "checkpoints": [{"path": optional(text), "sha256": optional(text), "learning_rate": rate, "epoch": optional(integer)}],
        "training": {"source": text, "num_triples": count, "fingerprint": text},
    },
    "settings": {"selection": one_of("last", "all", "names"), "num_last_layers": positive, "layer_names": [text],
                 "loss": text, "batch_size": positive, "shard_size": positive},
    "selection": {"parameters": [text]},
    "plans": [PLAN],
    "num_groups": optional(count),
    "examples_per_triple": one_of(1, 2),
    "num_rows": count,
    "files": Each(text),
    "shards": [{"checkpoint": count, "shard": count, "file": text, "row_start": count, "row_stop": count, "sha256": text}],
    "complete": flag,
    "replica?": (None, *REPLICA),
    "search_shards?": optional([[count]]),
}  # fmt: skip


_MISSING = object()


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse (:class:`InputError`, naming the key) a manifest without a key readers use, or with a value of
    another type or out of range."""
    problem = _problem(manifest, MANIFEST, "")
    if problem is not None:
        where, expected, found = problem
        what = "is missing" if found is _MISSING else f"must be {expected}, found {shown(found, 40)}"
        raise InputError(f"{path}: {where or 'the manifest'} {what}; the manifest is damaged or was edited: rebuild the "
                         "index (the same `tracin-index build`, another --out)")  # fmt: skip


def _problem(value: Any, shape: Any, where: str) -> tuple[str, str, Any] | None:
    """(where, what it should be, what it is) of the first value that does not fit ``shape``, or None."""
    if isinstance(shape, tuple):  # any of these shapes
        problems = [_problem(value, s, where) for s in shape]
        if all(problems):
            deepest = max(problems, key=lambda p: len(p[0]))  # type: ignore[index]
            return deepest if deepest[0] != where else (where, " or ".join(p[1] for p in problems), value)  # type: ignore[index]
        return None
    if shape is None:
        return None if value is None else (where, "null", value)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return where, "an object", value
        for key, inner in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{where}.{name}".lstrip("."), "present", _MISSING
            problem = _problem(value[name], inner, f"{where}.{name}".lstrip("."))
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return where, "a list", value
        for i, item in enumerate(value):
            problem = _problem(item, shape[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(shape, Each):
        if not isinstance(value, dict):
            return where, "an object", value
        for key, item in value.items():
            problem = _problem(item, shape.shape, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    expected = shape(value)
    return None if expected is None else (where, expected, value)
