"""Files written whole or not at all: through a hidden temporary name in the same folder, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without an
    error, removed otherwise, so ``path`` is never half-written.

    The temporary name keeps ``path``'s suffixes (writers that choose a format by suffix, like ``.tsv.gz``,
    still do). ``fsync``: flush it to the disk before the rename, so that after a crash of the machine
    ``path`` is the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        yield temporary
        if fsync:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """``write(temporary)``, then the rename of :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as temporary:
        write(temporary)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, value: Any, *, fsync: bool = False) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n", fsync=fsync)
