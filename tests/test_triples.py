"""Specification of reading triples and id maps, and of label <-> id conversion."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from tracin_index.errors import InputError, LabelError
from tracin_index.kg.triples import (
    IdMaps,
    LabeledTriples,
    make_id_maps,
    read_id_map,
    read_labeled_triples,
    write_id_map,
    write_labeled_triples,
)

ROWS = [
    ["aspirin", "treats", "headache"],
    ["ibuprofen", "treats", "fever"],
    ["aspirin", "interacts with", "ibuprofen"],
]


def write_bytes(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


@pytest.fixture
def id_maps() -> IdMaps:
    return IdMaps(
        entity_to_id={"germany": 0, "uk": 1, "usa_": 2, "ussr": 3},
        relation_to_id={"embassy": 0, "exports": 1},
    )


# --- reading and writing triples -------------------------------------------------------------


def test_reads_a_plain_tsv_in_file_order(tmp_path):
    triples = read_labeled_triples(write_bytes(tmp_path / "train.tsv", tsv(ROWS)))

    assert len(triples) == 3
    assert triples.labels.shape == (3, 3) and triples.labels.dtype == object
    assert triples.labels.tolist() == ROWS
    assert triples.line_numbers.tolist() == [1, 2, 3]
    assert triples.line_numbers.dtype == np.int64
    assert triples.source == str(tmp_path / "train.tsv")


def test_reads_a_gzipped_tsv(tmp_path):
    path = tmp_path / "train.tsv.gz"
    path.write_bytes(gzip.compress(tsv(ROWS).encode()))

    assert read_labeled_triples(path).labels.tolist() == ROWS


def test_strips_windows_line_endings(tmp_path):
    path = write_bytes(tmp_path / "train.tsv", tsv(ROWS).replace("\n", "\r\n"))

    assert read_labeled_triples(path).labels.tolist() == ROWS


def test_keeps_spaces_inside_and_around_labels(tmp_path):
    path = write_bytes(tmp_path / "train.tsv", "new york \tlocated in\t usa\n")

    assert read_labeled_triples(path).labels.tolist() == [["new york ", "located in", " usa"]]


def test_skips_blank_lines_and_keeps_physical_line_numbers(tmp_path):
    path = write_bytes(tmp_path / "train.tsv", "\n" + tsv(ROWS[:1]) + "\n  \n" + tsv(ROWS[1:]))

    triples = read_labeled_triples(path)

    assert triples.labels.tolist() == ROWS
    assert triples.line_numbers.tolist() == [2, 5, 6]


def test_a_line_without_three_fields_is_an_error_naming_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "train.tsv", tsv(ROWS[:2]) + "aspirin treats headache\n")

    with pytest.raises(InputError) as error:
        read_labeled_triples(path)

    assert str(error.value) == (
        f"{path}:3: expected 3 tab-separated fields (head, relation, tail), found 1: 'aspirin treats headache'"
    )


def test_an_empty_field_is_an_error_naming_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "train.tsv", "aspirin\t\theadache\n")

    with pytest.raises(InputError, match=r"train\.tsv:1: .*the relation is empty"):
        read_labeled_triples(path)


def test_a_missing_file_is_an_input_error(tmp_path):
    path = tmp_path / "nope.tsv"

    with pytest.raises(InputError) as error:
        read_labeled_triples(path)

    assert str(error.value) == f"{path}: no such file (expected a TSV of head<TAB>relation<TAB>tail)"


def test_a_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_labeled_triples(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_a_file_without_triples_is_an_input_error(tmp_path, text):
    path = write_bytes(tmp_path / "train.tsv", text)

    with pytest.raises(InputError, match="no triples"):
        read_labeled_triples(path)


def test_bytes_that_are_not_utf8_are_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(tsv(ROWS[:1]).encode() + b"caf\xe9\ttreats\tfever\n")

    with pytest.raises(InputError, match=r"train\.tsv:2: not valid UTF-8"):
        read_labeled_triples(path)


@pytest.mark.parametrize("name", ["out.tsv", "out.tsv.gz"])
def test_written_triples_read_back_the_same(tmp_path, name):
    write_labeled_triples(LabeledTriples.from_rows(ROWS, "rows"), tmp_path / name)

    assert read_labeled_triples(tmp_path / name).labels.tolist() == ROWS


def test_writes_gzip_when_the_path_ends_in_gz(tmp_path):
    write_labeled_triples(np.array(ROWS, dtype=object), tmp_path / "out.tsv.gz")

    assert gzip.decompress((tmp_path / "out.tsv.gz").read_bytes()).decode() == tsv(ROWS)


def test_from_rows_numbers_rows_from_one():
    triples = LabeledTriples.from_rows([("a", "r", "b")], source="--triple")

    assert triples.labels.tolist() == [["a", "r", "b"]]
    assert triples.line_numbers.tolist() == [1]
    assert triples.source == "--triple"


def test_from_rows_rejects_a_row_without_three_fields():
    with pytest.raises(InputError, match=r"--triple:1: expected 3 fields"):
        LabeledTriples.from_rows([("a", "r")], source="--triple")


# --- id maps ---------------------------------------------------------------------------------


def test_reads_pykeen_id_map_format(tmp_path):
    # What TriplesFactory.to_path_binary writes: gzip, header "id<TAB>label", rows sorted by id.
    path = tmp_path / "entity_to_id.tsv.gz"
    path.write_bytes(gzip.compress(b"id\tlabel\n0\tbrazil\n1\tburma\n2\tchina\n"))

    assert read_id_map(path) == {"brazil": 0, "burma": 1, "china": 2}


def test_reads_labels_that_pandas_quoted(tmp_path):
    # PyKEEN writes id maps with pandas, which quotes labels holding quotes or tabs.
    path = write_bytes(tmp_path / "entity_to_id.tsv", 'id\tlabel\n0\t"say ""hi"""\n1\t"a\tb"\n2\tplain\n')

    assert read_id_map(path) == {'say "hi"': 0, "a\tb": 1, "plain": 2}


@pytest.mark.parametrize("name", ["entity_to_id.tsv", "entity_to_id.tsv.gz"])
def test_id_map_round_trips_through_write_and_read(tmp_path, name):
    mapping = {"zebra": 0, "apple": 1, 'quote"d': 2, "tab\tbed": 3, "42": 4}

    write_id_map(mapping, tmp_path / name)

    assert read_id_map(tmp_path / name) == mapping


def test_written_id_map_is_pykeen_format_sorted_by_id(tmp_path):
    write_id_map({"b": 1, "a": 0}, tmp_path / "relation_to_id.tsv")

    assert (tmp_path / "relation_to_id.tsv").read_text() == "id\tlabel\n0\ta\n1\tb\n"


def test_reads_plain_label_tab_id_rows_without_header(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "brazil\t1\nburma\t0\n")

    assert read_id_map(path) == {"brazil": 1, "burma": 0}


def test_reads_id_tab_label_rows_without_header(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "1\tbrazil\n0\t1984\n")

    assert read_id_map(path) == {"brazil": 1, "1984": 0}


def test_numeric_labels_without_header_are_ambiguous(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "0\t10\n1\t11\n")

    with pytest.raises(InputError, match=r"map\.tsv: cannot tell the id column .*add a header line id<TAB>label"):
        read_id_map(path)


@pytest.mark.parametrize("text", ["id\tlabel\n0\t10\n1\t11\n", "label\tid\n10\t0\n11\t1\n"])
def test_a_header_line_settles_numeric_labels(tmp_path, text):
    path = write_bytes(tmp_path / "map.tsv", text)

    assert read_id_map(path) == {"10": 0, "11": 1}


def test_ids_with_a_gap_name_the_missing_id(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "id\tlabel\n0\ta\n1\tb\n3\tc\n")

    with pytest.raises(InputError) as error:
        read_id_map(path)

    assert str(error.value).startswith(f"{path}: ids must be 0..2 without gaps")
    assert "id 2 is missing" in str(error.value)


def test_a_duplicate_label_names_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "id\tlabel\n0\ta\n1\tb\n2\ta\n")

    with pytest.raises(InputError) as error:
        read_id_map(path)

    assert str(error.value) == f"{path}:4: duplicate label 'a' (already id 0 at line 2)"


def test_a_duplicate_id_names_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "a\t0\nb\t0\n")

    with pytest.raises(InputError, match=r"map\.tsv:2: duplicate id 0 \(already used by 'a' at line 1\)"):
        read_id_map(path)


def test_a_non_integer_id_names_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "label\tid\na\t0\nb\tone\n")

    with pytest.raises(InputError, match=r"map\.tsv:3: id 'one' is not an integer"):
        read_id_map(path)


def test_an_id_map_line_without_two_fields_names_file_and_line(tmp_path):
    path = write_bytes(tmp_path / "map.tsv", "a\t0\nb 1\n")

    with pytest.raises(InputError, match=r"map\.tsv:2: expected 2 tab-separated fields"):
        read_id_map(path)


def test_id_maps_read_from_files(tmp_path):
    write_id_map({"a": 0, "b": 1}, tmp_path / "entity_to_id.tsv.gz")
    write_id_map({"r": 0}, tmp_path / "relation_to_id.tsv.gz")

    maps = IdMaps.from_files(tmp_path / "entity_to_id.tsv.gz", tmp_path / "relation_to_id.tsv.gz")

    assert (maps.num_entities, maps.num_relations) == (2, 1)
    assert maps.id_to_entity == ["a", "b"] and maps.id_to_relation == ["r"]


# --- labels <-> ids --------------------------------------------------------------------------


def test_to_ids_equals_a_plain_dict_lookup(id_maps):
    rng = np.random.default_rng(0)
    entities, relations = list(id_maps.entity_to_id), list(id_maps.relation_to_id)
    rows = [[rng.choice(entities), rng.choice(relations), rng.choice(entities)] for _ in range(200)]
    expected = [
        [id_maps.entity_to_id[h], id_maps.relation_to_id[r], id_maps.entity_to_id[t]] for h, r, t in rows
    ]

    ids = id_maps.to_ids(LabeledTriples.from_rows(rows, "rows"))

    assert ids.dtype == torch.long and ids.shape == (200, 3)
    assert ids.tolist() == expected


def test_an_unknown_label_names_source_line_and_close_matches(tmp_path, id_maps):
    path = write_bytes(tmp_path / "test.tsv", "uk\tembassy\tussr\n\nusa\tembassy\tuk\n")

    with pytest.raises(LabelError) as error:
        id_maps.to_ids(read_labeled_triples(path))

    message = str(error.value)
    assert message.startswith(f"{path}:3: unknown head entity 'usa'; closest known entities: 'usa_'")
    assert "\n" not in message


def test_an_unknown_relation_is_named_a_relation(id_maps):
    triples = LabeledTriples.from_rows([["uk", "embasy", "ussr"]], "test")

    with pytest.raises(LabelError, match=r"test:1: unknown relation 'embasy'; closest known relations: 'embassy'"):
        id_maps.to_ids(triples)


def test_an_unknown_label_with_no_similar_labels_says_so(id_maps):
    triples = LabeledTriples.from_rows([["uk", "embassy", "zzzzzzzz"]], "test")

    with pytest.raises(LabelError) as error:
        id_maps.to_ids(triples)

    assert str(error.value) == "test:1: unknown tail entity 'zzzzzzzz'; no similar labels; see the id map"


def test_to_labels_inverts_to_ids(id_maps):
    triples = LabeledTriples.from_rows([["uk", "exports", "usa_"], ["ussr", "embassy", "germany"]], "rows")

    labels = id_maps.to_labels(id_maps.to_ids(triples))

    assert labels.dtype == object and labels.tolist() == triples.labels.tolist()


def test_to_labels_rejects_an_id_out_of_range(id_maps):
    with pytest.raises(LabelError, match=r"row 1: relation id 2 out of range; valid relation ids are 0\.\.1"):
        id_maps.to_labels(np.array([[0, 1, 2], [0, 2, 1]]))


def test_resolve_triple_by_label(id_maps):
    assert id_maps.resolve_triple("uk", "exports", "usa_") == (1, 1, 2)


def test_resolve_triple_by_id_accepts_integer_strings_and_ints(id_maps):
    assert id_maps.resolve_triple("3", 0, "1", by_id=True) == (3, 0, 1)


def test_resolve_triple_by_id_out_of_range_names_the_range(id_maps):
    with pytest.raises(LabelError) as error:
        id_maps.resolve_triple("0", "0", "4", by_id=True)

    assert str(error.value) == "--triple: tail entity id 4 out of range; valid entity ids are 0..3"


def test_resolve_triple_unknown_label_suggests_a_close_match(id_maps):
    with pytest.raises(LabelError, match=r"--triple: unknown head entity 'USA_'; closest known entities: 'usa_'"):
        id_maps.resolve_triple("USA_", "exports", "uk")


def test_id_maps_must_be_contiguous():
    with pytest.raises(InputError, match="id 1 is missing"):
        IdMaps(entity_to_id={"a": 0, "b": 2}, relation_to_id={"r": 0})


# --- agreement with PyKEEN -------------------------------------------------------------------


def test_make_id_maps_numbers_labels_as_pykeen_does():
    from pykeen.triples import TriplesFactory

    rows = np.array(
        [
            ["zurich", "located_in", "switzerland"],
            ["Bern", "capital_of", "switzerland"],
            ["zurich", "located_in", "bern"],
            ["10", "capital_of", "2"],
        ]
    )
    factory = TriplesFactory.from_labeled_triples(rows)

    maps = make_id_maps(LabeledTriples.from_rows(rows.tolist(), "rows"))

    assert dict(maps.entity_to_id) == dict(factory.entity_to_id)
    assert dict(maps.relation_to_id) == dict(factory.relation_to_id)
    assert IdMaps.from_triples_factory(factory) == maps


def test_make_id_maps_sorts_inverse_relations_after_their_base_as_pykeen_does():
    from pykeen.triples import TriplesFactory

    rows = np.array([["a", "r_a", "b"], ["a", "r_inverse", "b"], ["a", "r", "b"], ["a", "q", "b"]])
    # PyKEEN drops "_inverse" triples by default; keep them to compare the numbering alone.
    factory = TriplesFactory.from_labeled_triples(rows, filter_out_candidate_inverse_relations=False)

    maps = make_id_maps(LabeledTriples.from_rows(rows.tolist(), "rows"))

    assert dict(maps.relation_to_id) == dict(factory.relation_to_id)


def test_read_ids_streams_in_chunks_with_the_same_ids_and_line_numbers(tmp_path):
    from tracin_index.kg.triples import IdMaps, iter_labeled_triples, read_labeled_triples

    path = tmp_path / "t.tsv.gz"
    import gzip as _gzip

    rows = [f"e{i % 7}\tr{i % 3}\te{(i * 5) % 7}" for i in range(25)]
    text = "\n".join(rows[:10]) + "\n\n" + "\r\n".join(rows[10:]) + "\n"
    path.write_bytes(_gzip.compress(text.encode()))
    maps = IdMaps({f"e{i}": i for i in range(7)}, {f"r{i}": i for i in range(3)})
    whole = read_labeled_triples(path)
    chunks = list(iter_labeled_triples(path, chunk_rows=4))
    assert [len(c) for c in chunks] == [4, 4, 3, 4, 4, 4, 2]  # chunks of 4 lines; the blank line 11 is in the third
    assert np.concatenate([c.line_numbers for c in chunks]).tolist() == whole.line_numbers.tolist()
    assert maps.read_ids(path, chunk_rows=4).tolist() == maps.to_ids(whole).tolist()


def test_read_ids_names_the_line_of_an_unknown_label_in_a_later_chunk(tmp_path):
    from tracin_index.kg.triples import IdMaps

    path = tmp_path / "t.tsv"
    path.write_text("a\tr\tb\n" * 5 + "a\tr\tzz\n")
    maps = IdMaps({"a": 0, "b": 1}, {"r": 0})
    with pytest.raises(LabelError, match=rf"{path}:6: unknown tail entity 'zz'"):
        maps.read_ids(path, chunk_rows=2)


@pytest.mark.parametrize("compress", [False, True])
def test_a_byte_that_is_not_utf8_is_named_by_line_and_place_in_both_readers(tmp_path, compress):
    import gzip

    from tracin_index.kg.triples import iter_labeled_triples

    lines = [f"e{i}\tr{i % 3}\te{i + 1}".encode() for i in range(150)]
    lines[100] = lines[100][:4] + b"\xff" + lines[100][4:]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("bad.tsv.gz" if compress else "bad.tsv")
    path.write_bytes(gzip.compress(data) if compress else data)
    expected = f"{path}:101: not valid UTF-8 (byte 0xff at byte 5 of the line); save it as UTF-8"
    with pytest.raises(InputError) as whole:
        read_labeled_triples(path)
    with pytest.raises(InputError) as streamed:
        list(iter_labeled_triples(path, chunk_rows=40))
    assert str(whole.value) == str(streamed.value) == expected
