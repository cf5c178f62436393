"""Files written whole or not at all (through a hidden temporary name in the same folder, then a rename;
a full disk is a :class:`~tracin_index.errors.DiskFullError`), and the first difference between two JSON
records."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DiskFullError, TracInError

#: Less free space than this after a failed write means it failed for want of space: torch.save then says
#: only "unexpected pos", h5py "Can't synchronously write data", neither with an errno.
NEARLY_FULL = 256 * 2**10


def mib(n: float) -> str:
    """``1.7 MiB``, ``2.25 GiB``: sizes as the command line prints them."""
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def out_of_space(error: BaseException, folder: str | os.PathLike) -> int | None:
    """The bytes free in ``folder``'s file system if ``error``, raised by a write there, means it is full; else None."""
    if not isinstance(error, Exception) or isinstance(error, TracInError):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return free
    return free if free < NEARLY_FULL else None


def disk_full(path: str | os.PathLike, free: int, advice: str = "free some space and run the same command again") -> DiskFullError:
    return DiskFullError(f"{os.fspath(path)}: could not be written, the disk is full ({mib(free)} free); {advice}",
                         os.fspath(path), free)  # fmt: skip


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
    full = None
    try:
        yield temporary
        if fsync:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    except Exception as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)  # first: the space it took counts as free below
        full = out_of_space(error, path.parent)
        if full is None:
            raise
    finally:
        if temporary.exists():
            temporary.unlink()
    if full is not None:
        raise disk_full(path, full)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """``write(temporary)``, then the rename of :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as temporary:
        write(temporary)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, value: Any, *, fsync: bool = False) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n", fsync=fsync)


def first_difference(recorded: Any, wanted: Any, path: str = "", labels: tuple[str, str] = ("index", "now")) -> str | None:
    """The first key path where two JSON values differ, with both values, e.g.
    ``settings.sketch_dim (index: 64, now: 128)``; None where they are equal. ``labels``: what to call
    the recorded value and the wanted one."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for key in sorted(set(recorded) | set(wanted)):
            found = first_difference(recorded.get(key), wanted.get(key), f"{path}.{key}" if path else key, labels)
            if found:
                return found
        return None
    if isinstance(recorded, list) and isinstance(wanted, list) and len(recorded) == len(wanted):
        for i, (a, b) in enumerate(zip(recorded, wanted)):
            found = first_difference(a, b, f"{path}[{i}]", labels)
            if found:
                return found
        return None
    return None if recorded == wanted else f"{path} ({labels[0]}: {recorded!r}, {labels[1]}: {wanted!r})"
