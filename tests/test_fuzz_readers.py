"""Fuzzing the readers of the files a user gives (triples, id maps, checkpoints) and of the index manifest.

Every reader, given any bytes, ends in one of two ways: what the file says, exactly, or an error of our
own (:class:`~tracin_index.errors.TracInError`) whose one-line message names the file. Never another
exception (a crash, a traceback) and never a result other than what was written.

Hypothesis draws the inputs. The runs are reproducible: every test runs under ``@seed(SEED)`` with no
example database, so the same inputs come on every machine; the ``@example`` cases are inputs the fuzzers
found that once crashed a reader or read back differently (each one fixed in the reader).
"""

import contextlib
import gzip
import hashlib
import io
import json
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from tracin_index.errors import InputError, TracInError, TracInWarning
from tracin_index.gradients.adam import Preconditioner
from tracin_index.kg.checkpoints import find_checkpoints, load_state_dict_into, read_state_dict
from tracin_index.kg.triples import IdMaps, iter_labeled_triples, read_id_map, read_labeled_triples, write_labeled_triples
from tracin_index.storage.reader import IndexFiles

#: The seed of every fuzzer here: a failure names its input, and the same run reproduces it anywhere.
SEED = 20261204
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(FUZZ, max_examples=60)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the files of a test's examples (each example overwrites the last one's)."""
    return tmp_path_factory.mktemp("fuzz")


def clear_error(error: BaseException, *paths: Path) -> None:
    """Our own error, one line of at most a few hundred characters, naming the file (one of ``paths``, or a file in it)."""
    assert isinstance(error, TracInError), f"{type(error).__name__} escaped the reader: {error}"
    message = str(error)
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"
    named = [p for p in paths if str(p) in message or str(Path(p).resolve()) in message]
    assert named, f"the file is not named: {message!r}"
    assert len(message) < 400 + 2 * len(str(named[0])), f"{len(message)} characters: {message[:200]!r}..."


def read_or_error(read, path: Path):
    """``read(path)``, or None where it refused the file with a clear error."""
    try:
        return read(path)
    except Exception as error:  # anything but a clear error fails the test
        clear_error(error, path)
        return None


# -- triples ----------------------------------------------------------------------------------------

#: Characters of a label: anything UTF-8 can hold but the tab and the line breaks a TSV splits on.
LABEL_CHARS = st.one_of(
    st.characters(exclude_categories=("Cs",), exclude_characters="\t\n\r"),
    st.sampled_from("\"'[](){}<>\\#,;| \x00\ufeff\u2028\x85\x0b\x0c"),
)
labels = st.text(LABEL_CHARS, min_size=1, max_size=10).filter(str.strip)
rows = st.lists(st.lists(labels, min_size=3, max_size=3), min_size=1, max_size=12)


def utf8(text: str) -> bytes:
    """``text`` as a UTF-8 writer saves it: a byte order mark first where the text starts with U+FEFF
    (without one, every reader takes that character for the mark and drops it)."""
    return (b"\xef\xbb\xbf" if text.startswith("\ufeff") else b"") + text.encode("utf-8")


@st.composite
def tsv_files(draw):
    """A well-formed TSV of random labels, as editors and scripts write them: CRLF or LF, blank lines
    anywhere, a final line break or none, a byte order mark, gzip. Returns (bytes, rows, line numbers)."""
    table = draw(rows)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines, numbers = [], []
    for row in table:
        lines += [draw(st.sampled_from(["", " ", "\t", " \t "])) for _ in range(draw(st.integers(0, 2)))]
        lines.append("\t".join(row))
        numbers.append(len(lines))
    text = newline.join(lines) + (newline if draw(st.booleans()) else "")
    data = b"\xef\xbb\xbf" + text.encode() if draw(st.booleans()) else utf8(text)
    if draw(st.booleans()):
        data = gzip.compress(data, mtime=0)
    return data, table, numbers


def streamed(path: Path, chunk_rows: int) -> tuple[list[list[str]], list[int]]:
    """The triples of ``path`` as the streaming reader (``IdMaps.read_ids``) sees them."""
    chunks = list(iter_labeled_triples(path, chunk_rows))
    return [row for c in chunks for row in c.labels.tolist()], [n for c in chunks for n in c.line_numbers.tolist()]


@seed(SEED)
@FUZZ
@given(file=tsv_files(), chunk_rows=st.integers(1, 4))
@example(file=(b"\xef\xbb\xbf\xef\xbb\xbfa\tr\tb\n", [["\ufeffa", "r", "b"]], [1]), chunk_rows=1)  # a label's own U+FEFF
def test_a_tsv_of_any_labels_reads_back_exactly(scratch, file, chunk_rows):
    data, table, numbers = file
    path = scratch / "train.tsv"
    path.write_bytes(data)
    triples = read_labeled_triples(path)
    assert triples.labels.tolist() == table
    assert triples.line_numbers.tolist() == numbers
    assert streamed(path, chunk_rows) == (table, numbers)
    # ids through the streaming reader, against maps numbered here
    entities = {label: i for i, label in enumerate(sorted({r[0] for r in table} | {r[2] for r in table}))}
    relations = {label: i for i, label in enumerate(sorted({r[1] for r in table}))}
    ids = IdMaps(entities, relations).read_ids(path, chunk_rows).tolist()
    assert ids == [[entities[h], relations[r], entities[t]] for h, r, t in table]


@seed(SEED)
@FUZZ
@given(table=st.lists(st.lists(st.text(LABEL_CHARS | st.sampled_from("\t\n\r"), max_size=6), min_size=3, max_size=3),
                      min_size=1, max_size=8),
       suffix=st.sampled_from([".tsv", ".tsv.gz"]))  # fmt: skip
@example(table=[["\ufeffa", "r", "b"]], suffix=".tsv")  # read back as "a": the mark was not written
@example(table=[["a", " ", "b"]], suffix=".tsv")  # written, then refused on reading: a blank relation
def test_what_the_triples_writer_writes_reads_back_or_it_refuses(scratch, table, suffix):
    path = scratch / f"written{suffix}"
    writable = all(label.strip() and not any(c in label for c in "\t\n\r") for row in table for label in row)
    try:
        write_labeled_triples(np.array(table, dtype=object), path)
    except InputError as error:
        assert not writable, f"refused a writable table: {error}"
        clear_error(error, path)
        return
    assert writable, "wrote labels that cannot read back"
    assert read_labeled_triples(path).labels.tolist() == table


@st.composite
def tsv_like_bytes(draw):
    """Bytes that are nearly a TSV: lines of fields, with stray tabs, blank fields, bad UTF-8, NULs."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    pieces = st.one_of(st.text(LABEL_CHARS, max_size=4).map(str.encode), st.sampled_from(
        [b"\t", b"\t", b"\n", b"\r\n", b"\r", b" ", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\x1f\x8b", b"\x00"]))  # fmt: skip
    data = b"".join(draw(st.lists(pieces, max_size=40)))
    return gzip.compress(data, mtime=0) if draw(st.booleans()) else data


@seed(SEED)
@FUZZ
@given(data=tsv_like_bytes(), chunk_rows=st.integers(1, 3))
@example(data=b"0\t\r0\t0", chunk_rows=1)  # read as ("0", "\r0", "0") whole, as two lines streamed
def test_any_bytes_read_as_triples_or_give_a_clear_error(scratch, data, chunk_rows):
    path = scratch / "any.tsv"
    path.write_bytes(data)
    whole = read_or_error(read_labeled_triples, path)
    stream = read_or_error(lambda p: streamed(p, chunk_rows), path)
    if whole is None:
        assert stream is None or stream == ([], []), "the streaming reader took a file the whole-file reader refused"
        return
    assert all(len(row) == 3 and all(label.strip() for label in row) for row in whole.labels.tolist())
    assert stream == (whole.labels.tolist(), whole.line_numbers.tolist()), "the two readers read different triples"


@seed(SEED)
@FUZZ
@given(file=tsv_files(), cut=st.floats(0, 1, exclude_max=True))
def test_a_truncated_tsv_reads_as_the_lines_it_holds_or_gives_a_clear_error(scratch, file, cut):
    data, table, _ = file
    path = scratch / "cut.tsv"
    kept = data[: int(cut * len(data))]
    path.write_bytes(kept)
    triples = read_or_error(read_labeled_triples, path)
    if data[:2] == b"\x1f\x8b" and len(kept) >= 2:
        assert triples is None, "a truncated gzip file was read"  # its end-of-stream marker is missing
        return
    if triples is None:
        return
    got = triples.labels.tolist()
    # every triple but the last is one written whole; the last is whole or cut where the file ends
    assert got[:-1] == table[: len(got) - 1]
    *_, last_line = kept.removeprefix(b"\xef\xbb\xbf").decode("utf-8").rstrip("\r\n").rsplit("\n", 1)
    assert got[-1] == table[len(got) - 1] or got[-1] == last_line.rstrip("\r").split("\t")


# -- id maps ----------------------------------------------------------------------------------------

#: Labels PyKEEN's id maps can hold: anything but a lone carriage return (pandas writes it unquoted, and
#: then neither pandas nor anyone else reads the file back as written).
MAP_LABEL_CHARS = st.one_of(st.characters(exclude_categories=("Cs",), exclude_characters="\r"), st.sampled_from("\t\n\"'"))
map_labels = st.lists(st.text(MAP_LABEL_CHARS, min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=12,
                      unique=True)  # fmt: skip


def pykeen_id_map(path: Path, mapping: dict[str, int]) -> None:
    """The file as ``TriplesFactory.to_path_binary`` writes it (pykeen/triples/triples_factory.py)."""
    frame = pd.DataFrame(data=mapping.items(), columns=["label", "id"]).sort_values(by="id").set_index("id")
    frame.to_csv(path, sep="\t")


@seed(SEED)
@FUZZ
@given(names=map_labels, order=st.randoms(use_true_random=False), suffix=st.sampled_from([".tsv", ".tsv.gz"]))
def test_an_id_map_pykeen_writes_reads_back_exactly(scratch, names, order, suffix):
    ids = list(range(len(names)))
    order.shuffle(ids)
    mapping = dict(zip(names, ids))
    path = scratch / f"entity_to_id{suffix}"
    pykeen_id_map(path, mapping)
    assert read_id_map(path) == mapping


@seed(SEED)
@FUZZ
@given(names=st.lists(labels.filter(lambda s: s.strip() == s), min_size=1, max_size=10, unique=True),
       order=st.randoms(use_true_random=False),
       layout=st.sampled_from(["label id", "label id, no header", "id label, no header"]))  # fmt: skip
def test_a_two_column_id_map_reads_back_exactly_or_asks_for_a_header(scratch, names, order, layout):
    """Maps written by hand or by a script: split at the tab (a header id<TAB>label means PyKEEN's quoted format)."""
    ids = list(range(len(names)))
    order.shuffle(ids)
    mapping = dict(zip(names, ids))
    id_first = layout.startswith("id")
    lines = [f"{i}\t{label}" if id_first else f"{label}\t{i}" for label, i in mapping.items()]
    if "no header" not in layout:
        lines.insert(0, "\t".join(layout.split()))
    path = scratch / "map.tsv"
    path.write_bytes(utf8("\n".join(lines) + "\n"))
    if "no header" in layout and all(re.fullmatch(r"[+-]?[0-9]+", label) for label in names):
        with pytest.raises(InputError, match="add a header line") as refused:
            read_id_map(path)
        clear_error(refused.value, path)
    else:
        assert read_id_map(path) == mapping


@st.composite
def id_map_like_bytes(draw):
    """Bytes that are nearly an id map: headers, ids of any size and sign, quotes, tabs, bad UTF-8."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    number = st.one_of(st.integers(-3, 30), st.integers()).map(str) | st.just("1" + "0" * 5000)
    pieces = st.one_of(number.map(str.encode), st.text(LABEL_CHARS, max_size=4).map(str.encode), st.sampled_from(
        [b"id\tlabel\n", b"label\tid\n", b"\t", b"\t", b"\n", b"\n", b'"', b"\r\n", b"\xff", b"\x00", b"+", b" "]))  # fmt: skip
    return b"".join(draw(st.lists(pieces, max_size=30)))


@seed(SEED)
@FUZZ
@given(data=id_map_like_bytes())
@example(data=b"0\ta\n" + b"9" * 5000 + b"\tb\n")  # ValueError: exceeds the limit (4300 digits) for int()
@example(data=b"id\tlabel\n0\ta\n" + b"1" * 5000 + b"\tb\n")
@example(data=b"0\ta\n" + b"1" * 5000 + b"x\tb\n")  # a message of 5,000 characters, echoing the id
def test_any_bytes_read_as_an_id_map_or_give_a_clear_error(scratch, data):
    path = scratch / "map.tsv"
    path.write_bytes(data)
    mapping = read_or_error(read_id_map, path)
    if mapping is not None:
        assert sorted(mapping.values()) == list(range(len(mapping)))
        assert all(isinstance(label, str) and label.strip() for label in mapping)


@seed(SEED)
@FUZZ
@given(names=map_labels, cut=st.floats(0, 1, exclude_max=True))
def test_a_truncated_id_map_reads_as_the_entries_it_holds_or_gives_a_clear_error(scratch, names, cut):
    mapping = {label: i for i, label in enumerate(names)}
    whole = scratch / "whole.tsv"
    pykeen_id_map(whole, mapping)
    data = whole.read_bytes()
    path = scratch / "cut.tsv"
    path.write_bytes(data[: int(cut * len(data))])
    got = read_or_error(read_id_map, path)
    if got is None:
        return
    # the entries written whole, in id order; the last one's label may be cut where the file ends
    *whole_entries, (last, index) = sorted(got.items(), key=lambda item: item[1])
    assert whole_entries == list(mapping.items())[: len(whole_entries)]
    assert index == len(whole_entries) and names[index].startswith(last)


# -- checkpoints ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.complex64]  # fmt: skip


@st.composite
def tensors(draw, dtypes=DTYPES, finite: bool = False, devices=("cpu",), shapes=st.lists(st.integers(0, 3), max_size=2)):
    """A small tensor of any dtype and shape (0-d and empty included); NaN and infinities unless ``finite``."""
    shape = draw(shapes)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * 100
    if not finite and values.numel() and draw(st.booleans()):
        values.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    tensor = values.to(draw(st.sampled_from(dtypes)))
    return tensor.to(draw(st.sampled_from(devices)))


#: What a file that torch.load(weights_only=True) reads may hold: numbers of any size, strings, tensors
#: (on the meta device too: they hold no data), and lists, tuples and dicts of them, nested.
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(2**63), 2**64]) | st.floats()
    | st.text(max_size=5) | tensors(devices=("cpu", "meta")),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
#: The state dict of the model the fuzzers load into (``model()``), right or wrong in every way.
state_dicts = st.fixed_dictionaries({}, optional={
    "weight": tensors(devices=("cpu", "meta"), shapes=st.just([1, 2]) | st.lists(st.integers(0, 3), max_size=2)) | plain_values,
    "bias": tensors(devices=("cpu", "meta"), shapes=st.just([1]) | st.lists(st.integers(0, 3), max_size=2)) | plain_values,
    "extra": tensors()}) | plain_values  # fmt: skip
checkpoint_contents = st.fixed_dictionaries({}, optional={
    "model_state_dict": state_dicts, "state_dict": state_dicts, "learning_rate": plain_values, "epoch": plain_values,
    "optimizer": plain_values}) | plain_values  # fmt: skip


def model() -> torch.nn.Module:
    """A stand-in for a PyKEEN model: what loading a state dict into one takes is the same."""
    return torch.nn.Linear(2, 1).double()


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def item(value):
    """A one-element tensor as the number it holds (as checkpoints may store the epoch and learning rate)."""
    return value.item() if isinstance(value, torch.Tensor) else value


@seed(SEED)
@FUZZ
@given(state=st.dictionaries(st.text(min_size=1, max_size=5), tensors(finite=True), min_size=1, max_size=4),
       learning_rate=st.floats(0, 1e300) | st.integers(0, 10**6) | st.floats(0, 10).map(torch.tensor) | st.none(),
       epoch=st.integers(0, 2**63 - 1) | st.integers(0, 100).map(torch.tensor) | st.none())  # fmt: skip
def test_a_checkpoint_reads_back_exactly(scratch, state, learning_rate, epoch):
    written = {"model_state_dict": state}
    written.update({"learning_rate": learning_rate} if learning_rate is not None else {})
    written.update({"epoch": epoch} if epoch is not None else {})
    path = save(written, scratch / "epoch.pt")
    with pytest.warns(TracInWarning) if learning_rate is None else contextlib.nullcontext():  # the missing rate counts as 1.0
        (checkpoint,) = find_checkpoints([path])
    assert checkpoint.learning_rate == (1.0 if learning_rate is None else float(item(learning_rate)))
    assert checkpoint.epoch == item(epoch)
    read = read_state_dict(path)
    assert list(read) == list(state)
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)


@seed(SEED)
@FUZZ
@given(contents=checkpoint_contents)
@example(contents={"model_state_dict": {}, "learning_rate": 10**400})  # OverflowError from math.isfinite
@example(contents={"model_state_dict": {}, "learning_rate": torch.empty((), device="meta")})  # RuntimeError from .item()
@example(contents={"model_state_dict": {}, "learning_rate": [0.1] * 100_000})  # a message of 500,000 characters
@example(contents={"learning_rate": torch.ones(2, 1)})  # a message of two lines (the tensor's repr)
@example(contents={"weight": torch.empty(1, 2, device="meta"), "bias": torch.ones(1)})  # RuntimeError loading it
@example(contents={"weight": torch.ones(1, 2, dtype=torch.complex64), "bias": torch.ones(1)})  # the imaginary part lost
def test_any_contents_of_a_checkpoint_read_as_written_or_give_a_clear_error(scratch, contents):
    path = save(contents, scratch / "any.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracInWarning)  # no learning rate: 1.0, said in a warning
        found = read_or_error(lambda p: find_checkpoints([p]), path)
    if found is not None:
        (checkpoint,) = found
        written = contents.get("learning_rate")
        assert checkpoint.learning_rate == (1.0 if written is None else float(item(written)))
        assert math.isfinite(checkpoint.learning_rate) and checkpoint.learning_rate >= 0
        assert checkpoint.epoch == item(contents.get("epoch"))
    state = read_or_error(read_state_dict, path)
    if state is None:
        return
    target = model()
    if read_or_error(lambda p: load_state_dict_into(target, state, str(p)) or "loaded", path):
        for name, value in target.state_dict().items():  # what the file holds, in the model's dtype
            assert not state[name].dtype.is_complex, f"complex {name} loaded into a real model"
            torch.testing.assert_close(value, state[name].to(value.dtype), rtol=0, atol=0, equal_nan=True)


def archive(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def with_pickle(data: bytes, pickled: bytes) -> bytes:
    """The torch.save archive ``data`` with its pickle (``data.pkl``) replaced: what the unpickler sees is fuzzed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            new.writestr(info, pickled if info.filename.endswith("data.pkl") else old.read(info))
    return out.getvalue()


VALID = {"model_state_dict": {"weight": torch.ones(1, 2, dtype=torch.float64), "bias": torch.zeros(1)},
         "learning_rate": 0.01, "epoch": 3}  # fmt: skip


@st.composite
def torch_file_bytes(draw):
    """Bytes that are nearly a checkpoint: an archive whose pickle is random or mutated, a bare pickle, noise."""
    data = archive(VALID)
    pickled = zipfile.ZipFile(io.BytesIO(data)).read(next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist()
                                                          if n.endswith("data.pkl")))  # fmt: skip
    kind = draw(st.sampled_from(["noise", "pickle", "archive, another pickle", "archive, a mutated pickle"]))
    if kind == "noise":
        return draw(st.binary(max_size=300))
    if kind == "pickle":
        return b"\x80" + draw(st.binary(max_size=100))
    if kind == "archive, another pickle":
        return with_pickle(data, b"\x80\x02" + draw(st.binary(max_size=100)))
    at = draw(st.integers(0, len(pickled) - 1))
    return with_pickle(data, pickled[:at] + draw(st.binary(min_size=1, max_size=4)) + pickled[at + 1 :])


@seed(SEED)
@FUZZ
@given(data=torch_file_bytes())
def test_any_bytes_in_a_checkpoint_file_give_a_clear_error_or_plain_values(scratch, data):
    path = scratch / "noise.pt"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracInWarning)
        read_or_error(lambda p: find_checkpoints([p]), path)
    read_or_error(read_state_dict, path)


@seed(SEED)
@QUICK
@given(cut=st.integers(0, len(archive(VALID)) - 1))
@example(cut=100)  # torch's error, a paragraph long, was the message's middle
def test_a_truncated_checkpoint_gives_a_clear_error(scratch, cut):
    path = scratch / "cut.pt"
    path.write_bytes(archive(VALID)[:cut])  # an archive's directory is at its end: any cut loses it
    with pytest.raises(TracInError) as refused:
        find_checkpoints([path])
    clear_error(refused.value, path)


#: The optimizer record of a checkpoint (kg.checkpoints.optimizer_record) for the parameters of ``model()``.
SHAPES = {"weight": (1, 2), "bias": (1,)}


def mostly(valid, wrong=plain_values):
    """``valid`` nine times in ten, else anything (then the reader must refuse it, or find it valid)."""
    return st.one_of(*[valid] * 9, wrong)


def moments(shape):
    return tensors(dtypes=[torch.float32, torch.float64], finite=True, shapes=st.just(list(shape))).map(torch.abs)


optimizer_records = mostly(st.fixed_dictionaries({
    "name": mostly(st.just("Adam")), "beta2": mostly(st.floats(0, 1, exclude_max=True)), "eps": mostly(st.floats(1e-12, 1)),
    "step": mostly(st.fixed_dictionaries({n: mostly(st.integers(1, 10**6)) for n in SHAPES})),
    "exp_avg_sq": mostly(st.fixed_dictionaries({n: mostly(moments(shape) | tensors()) for n, shape in SHAPES.items()})),
}).flatmap(lambda record: st.sets(st.sampled_from(sorted(record)), max_size=1).map(
    lambda dropped: {k: v for k, v in record.items() if k not in dropped})))  # fmt: skip
VALID_RECORD = {"name": "Adam", "beta2": 0.999, "eps": 1e-8, "step": {"weight": 3, "bias": 3},
                "exp_avg_sq": {"weight": torch.full((1, 2), 0.25), "bias": torch.full((1,), 4.0)}}  # fmt: skip


@seed(SEED)
@FUZZ
@given(record=optimizer_records)
@example(record={**VALID_RECORD, "step": {"weight": 10**400, "bias": 3}})  # OverflowError: beta2 ** step
@example(record={**VALID_RECORD, "beta2": "0.999"})  # ValueError from float()
@example(record={**VALID_RECORD, "exp_avg_sq": [1, 2]})  # TypeError
@example(record={**VALID_RECORD, "exp_avg_sq": {"weight": [0.25, 0.25], "bias": 4.0}})  # AttributeError: .double()
@example(record={**VALID_RECORD, "beta2": 1.0})  # 1 / (1 - beta2 ** step): every step would be zero
@example(record={**VALID_RECORD, "exp_avg_sq": {"weight": torch.ones(3), "bias": torch.ones(1)}})  # another shape
def test_any_optimizer_record_of_a_checkpoint_gives_adams_preconditioner_or_a_clear_error(scratch, record):
    path = save({**VALID, "optimizer": record}, scratch / "adam.pt")
    (checkpoint,) = find_checkpoints([path])
    preconditioner = read_or_error(lambda p: Preconditioner.at(checkpoint, list(SHAPES), shapes=SHAPES), path)
    if preconditioner is None:
        return
    for name, factor in preconditioner.factors.items():  # 1 / (sqrt(v / (1 - beta2^t)) + eps), as written
        v, t = record["exp_avg_sq"][name].double(), record["step"][name]
        expected = 1 / ((v / (1 - float(record["beta2"]) ** t)).sqrt() + float(record["eps"]))
        assert factor.shape == SHAPES[name] and torch.isfinite(factor).all()
        torch.testing.assert_close(factor, expected)


# -- the index manifest -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_dir(tiny_index) -> Path:
    """A small complete index (ConvE on Nations, two checkpoints); the manifest test rewrites its manifest.json
    for each example, and puts it back."""
    return tiny_index


def what_an_index_reads(directory: Path) -> dict:
    """Everything a query and `verify` read through the manifest, short of scoring: the triples, the checkpoints,
    every stored array, the exact norms, the model and its selected parameters, and verify's problems."""
    files = IndexFiles.open(directory)
    model = files.load_run(allow_pickle=False).model
    return {
        "triples": (files.hrt.tolist(), files.entity_labels, files.relation_labels, files.num_triples, files.per_triple),
        "checkpoints": [(c.path, c.learning_rate) for c in files.checkpoints],
        "plans": files.plans,
        "arrays": [digests(files.factor_arrays(c).arrays) for c in range(len(files.checkpoints))],
        "self_influences": files.self_influences().tolist(),
        "model": digests(model.state_dict()),
        "parameters": files.selection_of(model).parameter_names,
        "problems": files.verify(),
    }


def digests(tensors: dict) -> dict:
    return {k: (v.dtype, tuple(v.shape), hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()) for k, v in tensors.items()}


def nodes(value, at=()):
    """The paths (keys and indices) to every value inside a JSON document."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield at + (key,)
        yield from nodes(child, at + (key,))


def kind(value) -> str:
    """A JSON value's kind; an int where a float was is the same kind (a number: not damage, another number)."""
    return {bool: "bool", int: "number", float: "number"}.get(type(value), type(value).__name__)


OTHER_TYPES = [None, True, 0, 1.5, "x", [], {}, [0], {"x": 0}]
HUGE_OR_NEGATIVE = [-1, 2**40, 2**63, 10**30]
DEEP = b'{"format": "tracin-index", "format_version": 3, "inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@dataclass(frozen=True)
class Damage:
    """What is done to a manifest: ``how`` ("remove" a key, "retype" or "set" a value, "cut" or "replace" the bytes),
    ``where`` (a path of keys and indices, or a fraction that picks one of the manifest's paths, or where to cut)."""

    how: str
    where: tuple | float = 0.0
    value: object = None

    def apply(self, manifest: dict) -> bytes:
        data = json.dumps(manifest, indent=1).encode()
        if self.how == "cut":
            return data[: int(self.where * len(data))]
        if self.how == "replace":
            return self.value
        damaged = json.loads(data)
        if isinstance(self.where, tuple):
            path = self.where
        else:  # a key to remove, a value of any kind to retype, an integer to set huge or negative
            fits = {"remove": lambda p, v: isinstance(p[-1], str), "retype": lambda p, v: True,
                    "set": lambda p, v: isinstance(v, int) and not isinstance(v, bool)}[self.how]  # fmt: skip
            paths = [p for p in nodes(damaged) if fits(p, get(damaged, p))]
            path = paths[int(self.where * len(paths))]
        parent, key = get(damaged, path[:-1]), path[-1]
        if self.how == "remove":
            del parent[key]
        elif self.how == "retype":  # the first value of another kind, from the one drawn on
            start = OTHER_TYPES.index(self.value)
            parent[key] = next(v for v in OTHER_TYPES[start:] + OTHER_TYPES[:start] if kind(v) != kind(parent[key]))
        else:
            parent[key] = self.value
        return json.dumps(damaged).encode()


fraction = st.floats(0, 1, exclude_max=True)
damages = st.one_of(
    st.builds(Damage, st.just("remove"), fraction),
    st.builds(Damage, st.just("retype"), fraction, st.sampled_from(OTHER_TYPES)),
    st.builds(Damage, st.just("set"), fraction, st.sampled_from(HUGE_OR_NEGATIVE)),
    st.builds(Damage, st.just("cut"), fraction),
    st.builds(Damage, st.just("replace"), value=st.binary(max_size=200)),
)


def get(document, path):
    for key in path:
        document = document[key]
    return document


@pytest.fixture(scope="module")
def intact(index_dir) -> tuple[bytes, dict]:
    """The index's manifest, and what the index reads through it."""
    return (index_dir / "manifest.json").read_bytes(), what_an_index_reads(index_dir)


@seed(SEED)
@settings(FUZZ, max_examples=200)
@given(damage=damages)
@example(damage=Damage("replace", value=DEEP))  # RecursionError from json.loads
@example(damage=Damage("remove", ("replica", "batch_norm")))  # KeyError building the model
@example(damage=Damage("set", ("replica", "shape", "embedding_dim"), 2**40))  # RuntimeError: can't allocate 2 PB
@example(damage=Damage("set", ("num_rows",), 2**40))  # MemoryError: the norms of 2**40 rows
@example(damage=Damage("set", ("shards", 0, "row_start"), 2**40))  # KeyError reading the stored arrays
@example(damage=Damage("set", ("shards", 1, "checkpoint"), 2**40))  # KeyError
@example(damage=Damage("set", ("inputs", "checkpoints", 0, "learning_rate"), "0.01"))  # read as the string "0.01"
@example(damage=Damage("set", ("plans", 0, "sizes", 0), 2**40))  # read as another index (refine's bias test)
@example(damage=Damage("set", ("plans", 0, "derived", 1), 2**40))
@example(damage=Damage("set", ("plans", 0, "derived"), None))  # an output side the shards do not hold
@example(damage=Damage("set", ("plans", 0, "examples"), 2**40))
@example(damage=Damage("set", ("plans", 1, "examples"), 2**40))
@example(damage=Damage("set", ("plans", 1, "sketch", 0), 2**40))  # KeyError: principal directions of a dense block
@example(damage=Damage("set", ("inputs", "checkpoints", 1, "path"), None))  # read as the model itself: other weights
def test_a_damaged_manifest_is_refused_in_one_line_or_reads_as_the_intact_one(index_dir, tiny_run, intact, damage):
    manifest, expected = intact
    try:
        (index_dir / "manifest.json").write_bytes(damage.apply(json.loads(manifest)))
        try:
            got = what_an_index_reads(index_dir)
        except Exception as error:  # anything but a clear error fails the test
            clear_error(error, index_dir, tiny_run)
            return
        different = [key for key in expected if got[key] != expected[key]]
        assert not different, f"a damaged manifest read as another index: {different[0]} {str(got[different[0]])[:300]}"
    finally:
        (index_dir / "manifest.json").write_bytes(manifest)
