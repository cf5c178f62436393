"""The index directory on disk: manifest, per-checkpoint HDF5 factor shards, bases, triples, lock.

```
idx/
  manifest.json                     inputs (paths relative to idx/), settings, block plans, every file's sha256
  triples.h5                        "hrt" ids per training row, entity and relation labels, (head, relation) group ids
  bases/ckpt-000.h5                 principal directions of each sketched side (int8, a float32 scale per direction), per checkpoint
  shards/ckpt-000/shard-00000.h5    the rows' stored factors (tracin_index.storage.plans, .encoding) + "squared_norms"
```

Every file is written under a temporary name and renamed when complete, and the manifest is
rewritten (atomically) after each shard, so a build killed at any point resumes from what is there.
Every file's sha256 is in the manifest: ``verify`` checks them all. A digest protects against
accidents (a half-copied index, a disk error), not against someone who writes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

from .. import files
from ..errors import InputError, shown
from .manifest import check_manifest

FORMAT = "tracin-index"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TRIPLES = "triples.h5"
LOCK = ".lock"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- paths relative to the index ------------------------------------------------------------------


def relative_path(path: str | os.PathLike, directory: Path) -> str:
    """``path`` as the manifest records it: relative to the index directory, so that an index moved
    together with its run directory still finds it."""
    absolute = Path(path).resolve()
    try:
        return os.path.relpath(absolute, directory.resolve())
    except ValueError:  # another drive (Windows): only an absolute path can say where it is
        return str(absolute)


def resolve_path(recorded: str, directory: Path) -> Path:
    """A path the manifest recorded, found again from the index directory."""
    return Path(recorded) if os.path.isabs(recorded) else (directory / recorded)


# -- manifest and lock ----------------------------------------------------------------------------


def write_manifest(directory: Path, manifest: dict[str, Any], *, durable: bool = True) -> None:
    """The manifest, written atomically (a killed process leaves the old one or the new one whole);
    ``durable``: fsynced too, so that it survives a crash of the machine (an fsync is slow: the build
    asks for it at checkpoint boundaries, not after every shard file)."""
    files.write_json_atomic(directory / MANIFEST, manifest, fsync=durable)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.exists():
        raise InputError(f"{directory}: no such index directory (create one with `tracin-index build --out {directory}`)")
    if not directory.is_dir():
        raise InputError(f"{directory}: is a file, not an index directory")
    if not path.is_file():
        raise InputError(f"{directory}: not an index directory (no {MANIFEST}); build one with `tracin-index build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable manifest ({str(error)[:120]})") from None
    except RecursionError:  # lists in lists, thousands deep
        raise InputError(f"{path}: unreadable manifest (nested too deep)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a tracin-index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: index format version {shown(manifest.get('format_version'), 20)} but this tracin-index reads version "
            f"{FORMAT_VERSION}; rebuild the index (same `tracin-index build` command, another --out)"
        )
    check_manifest(manifest, path)
    return manifest


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` for an index, or say in one line why it cannot be."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is a file; give --out a new or empty directory")
    for parent in directory.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{directory}: {parent} is a file, not a directory; give --out a path under a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{directory}: cannot create the index directory ({error.strerror or error})") from None


#: Seconds a build waits for the lock before it refuses: a probe (:func:`build_running`, a query's or a build's) holds it for an instant.
LOCK_PATIENCE = 0.5


def another_build(directory: Path) -> InputError:
    return InputError(f"{directory}: another build is writing this index right now; wait for it or use another --out")


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """Refuse a second build into the same directory while one runs (released even on kill -9)."""
    prepare_directory(directory)
    handle = open(directory / LOCK, "a+")
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise another_build(directory) from None
            time.sleep(0.01)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def build_running(directory: Path) -> bool:
    """Whether a build holds ``directory``'s lock right now (creates nothing: an index on a read-only disk, or
    copied without its lock file, has no build running)."""
    try:
        handle = open(directory / LOCK, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def refuse_while_building(directory: Path) -> None:
    """Refuse (one line) to read ``directory`` while a build writes it: its manifest and files are not yet those
    of a complete index."""
    if build_running(directory):
        raise InputError(f"{directory}: a build is writing this index right now; run this again once it has finished")


# -- shards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    """One shard file of an index: one checkpoint's stored factors of one range of stored rows (the unit
    a build computes independently, :class:`~tracin_index.build.task.BuildTask`)."""

    checkpoint: int
    shard: int
    row_start: int
    row_stop: int

    @property
    def relative_path(self) -> str:
        return f"shards/ckpt-{self.checkpoint:03d}/shard-{self.shard:05d}.h5"


def plan_shard_files(num_rows: int, shard_size: int, num_checkpoints: int) -> list[ShardFile]:
    """The shard files of an index, checkpoint by checkpoint (a build computes them in this order, so
    that a worker loads each checkpoint once)."""
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    starts = list(enumerate(range(0, num_rows, shard_size)))
    return [ShardFile(c, s, start, min(start + shard_size, num_rows)) for c in range(num_checkpoints) for s, start in starts]


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> str:
    """An HDF5 file of named arrays (``a/b/c`` names make groups), written atomically; returns its sha256.

    Not fsynced: a file is trusted only through the checksum the manifest records, so one that a
    crash left incomplete is found and rebuilt by the next build (or named by `verify`).
    """

    def fill(f: h5py.File) -> None:
        for name, value in arrays.items():
            f.create_dataset(name, data=np.asarray(value), track_times=False)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value

    return write_h5(path, fill, track_order=True)


def write_h5(path: Path, fill: Callable[[h5py.File], None], **options) -> str:
    """The HDF5 file that ``fill(f)`` makes, written atomically; returns its sha256.

    HDF5 makes the file in memory and Python writes it out: HDF5 writing to a disk that fills up fails, and
    closing the file after that crashes the process (a segmentation fault in ``File.close``); a plain write
    ends in an ``OSError`` (a :class:`~tracin_index.errors.DiskFullError` from :func:`files.atomic_path`).
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **options) as f:
        fill(f)
    image = buffer.getbuffer()
    with files.atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(image)
    return hashlib.sha256(image).hexdigest()


def read_arrays(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a file written by :func:`write_arrays` (all, or those named)."""
    try:
        with h5py.File(path, "r") as f:
            if names is None:
                names = []
                f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
            return {name: f[name][...] for name in names}
    except (OSError, KeyError) as error:
        raise InputError(f"{path}: unreadable ({error}); run the same `tracin-index build` again to rebuild it") from None


def search_ranges(num_triples: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ranges of training triples of (nearly) equal size: the search shards a cluster
    holds an index in (:mod:`tracin_index.search.shards`), recorded by ``build --index-shards``."""
    if shards < 1:
        raise InputError(f"--index-shards must be at least 1, got {shards}")
    shards = min(shards, max(1, num_triples))
    bounds = np.linspace(0, num_triples, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# -- triples --------------------------------------------------------------------------------------


def write_triples(path: Path, hrt: np.ndarray, entity_labels: list[str], relation_labels: list[str], source: str,
                  groups: np.ndarray | None = None) -> str:  # fmt: skip
    """Row -> ids, the labels, and (when a block is grouped) each row's (head, relation) group; returns the sha256."""
    strings = h5py.string_dtype("utf-8")

    def fill(f: h5py.File) -> None:
        f.create_dataset("hrt", data=np.asarray(hrt, dtype=np.int64), track_times=False)
        f.create_dataset("entity_labels", data=np.asarray(entity_labels, dtype=object), dtype=strings, track_times=False)
        f.create_dataset("relation_labels", data=np.asarray(relation_labels, dtype=object), dtype=strings, track_times=False)
        if groups is not None:
            f.create_dataset("groups", data=np.asarray(groups, dtype=np.int64), track_times=False)
        f.attrs["source"] = source

    return write_h5(path, fill)


def read_triples(path: Path) -> tuple[np.ndarray, list[str], list[str], np.ndarray | None]:
    try:
        with h5py.File(path, "r") as f:
            hrt = f["hrt"][...]
            entities = [s.decode() if isinstance(s, bytes) else s for s in f["entity_labels"][...]]
            relations = [s.decode() if isinstance(s, bytes) else s for s in f["relation_labels"][...]]
            groups = f["groups"][...] if "groups" in f else None
    except (OSError, KeyError) as error:
        raise InputError(f"{path}: unreadable triples file ({error}); rebuild the index") from None
    return hrt, entities, relations, groups


def bases_path(checkpoint: int) -> str:
    return f"bases/ckpt-{checkpoint:03d}.h5"


def fingerprint_ids(hrt: np.ndarray) -> str:
    """The training triples' ids as the manifest fingerprints them (sha256 of the int64 (n, 3) array)."""
    return hashlib.sha256(np.ascontiguousarray(hrt, dtype=np.int64).tobytes()).hexdigest()
