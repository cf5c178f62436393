"""The FAISS inner-product index: exact where it should be, recall where it may not be, safe on disk."""

import os

import faiss
import numpy as np
import pytest

from tracin_index.errors import InputError
from tracin_index.search import INDEX_TYPES, InnerProductIndex, SearchResult, gpu_available

DIM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """These indexes are tiny: OpenMP threads only add spinning, which on a busy machine costs seconds."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def vectors():
    return np.random.default_rng(0).standard_normal((2000, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def queries():
    return np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)


def brute_force(vectors, queries, k, largest=True):
    """Rows and scores of the k largest (or most negative) inner products, by numpy."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def build(index_type, vectors, **options):
    index = InnerProductIndex.create(vectors.shape[1], index_type, **options)
    index.train(vectors)
    index.add(vectors)
    return index


def test_flat_search_returns_exact_top_k(vectors, queries):
    result = build("flat", vectors).search(queries, 10)
    scores, rows = brute_force(vectors, queries, 10)
    assert isinstance(result, SearchResult)
    assert result.scores.dtype == np.float32 and result.rows.dtype == np.int64
    assert result.rows.shape == (20, 10)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)


def test_opponents_are_the_most_negative_in_ascending_order(vectors, queries):
    result = build("flat", vectors).search_opponents(queries, 10)
    scores, rows = brute_force(vectors, queries, 10, largest=False)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    assert (result.scores < 0).all()
    assert (np.diff(result.scores, axis=1) >= 0).all()


def test_flat_fp16_top_10_nearly_matches_exact(vectors, queries):
    result = build("flat-fp16", vectors).search(queries, 10)
    _, rows = brute_force(vectors, queries, 10)
    overlap = [len(set(found) & set(exact)) for found, exact in zip(result.rows, rows)]
    assert min(overlap) >= 9


def test_ivf_probing_every_list_equals_flat(vectors, queries):
    ivf = InnerProductIndex.create(DIM, "ivf")
    assert ivf.needs_training and ivf.nlist is None
    ivf.train(vectors)
    assert ivf.nlist == int(4 * np.sqrt(len(vectors)))
    assert ivf.nprobe == ivf.nlist // 8
    ivf.nprobe = ivf.nlist
    ivf.add(vectors)
    flat = build("flat", vectors)
    for search in ("search", "search_opponents"):
        expected, found = getattr(flat, search)(queries, 10), getattr(ivf, search)(queries, 10)
        np.testing.assert_array_equal(found.rows, expected.rows)
        np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-5, atol=1e-5)


def test_ivf_with_explicit_nlist_and_nprobe():
    index = InnerProductIndex.create(DIM, "ivf", nlist=16, nprobe=3)
    assert index.nlist == 16 and index.nprobe == 3


def test_ivf_refuses_to_add_before_training(vectors):
    with pytest.raises(InputError, match="train"):
        InnerProductIndex.create(DIM, "ivf", nlist=8).add(vectors)


def test_hnsw_recall_at_10_is_at_least_0_9():
    rng = np.random.default_rng(2)
    data = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = rng.standard_normal((50, 64)).astype(np.float32)
    index = build("hnsw", data)
    assert index.ef_search == 128
    found = index.search(queries, 10).rows
    _, exact = brute_force(data, queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_streaming_add_in_chunks_equals_one_add(index_type, vectors, queries):
    whole = build(index_type, vectors)
    chunked = InnerProductIndex.create(DIM, index_type)
    chunked.train(vectors)
    for start in range(0, len(vectors), 300):
        chunked.add(vectors[start : start + 300])
    assert chunked.ntotal == len(vectors)
    if index_type == "hnsw":  # the graph depends on insertion batches; the answers should not
        found, expected = chunked.search(queries, 10).rows, whole.search(queries, 10).rows
        assert np.mean([len(set(f) & set(e)) for f, e in zip(found, expected)]) >= 9
        return
    np.testing.assert_array_equal(chunked.search(queries, 10).rows, whole.search(queries, 10).rows)
    np.testing.assert_array_equal(chunked.search(queries, 10).scores, whole.search(queries, 10).scores)


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_save_and_open_round_trip_gives_identical_results(index_type, vectors, queries, tmp_path):
    index = build(index_type, vectors)
    path = tmp_path / "faiss.index"
    index.save(path)
    assert os.listdir(tmp_path) == ["faiss.index"]
    opened = InnerProductIndex.open(path)
    assert opened.index_type == index_type
    assert opened.ntotal == index.ntotal and opened.dim == DIM
    assert opened.nprobe == index.nprobe and opened.ef_search == index.ef_search
    for search in ("search", "search_opponents"):
        expected, found = getattr(index, search)(queries, 10), getattr(opened, search)(queries, 10)
        np.testing.assert_array_equal(found.rows, expected.rows)
        np.testing.assert_array_equal(found.scores, expected.scores)


def test_save_replaces_an_existing_file_and_leaves_no_temporary(vectors, tmp_path):
    path = tmp_path / "faiss.index"
    build("flat", vectors[:10]).save(path)
    build("flat", vectors).save(path)
    assert os.listdir(tmp_path) == ["faiss.index"]
    assert InnerProductIndex.open(path).ntotal == len(vectors)


def test_open_with_the_wrong_type_names_both(vectors, tmp_path):
    path = tmp_path / "faiss.index"
    build("flat", vectors).save(path)
    with pytest.raises(InputError, match="'flat'.*'hnsw'"):
        InnerProductIndex.open(path, index_type="hnsw")


def test_opening_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.index"
    with pytest.raises(InputError, match="nowhere.index"):
        InnerProductIndex.open(path)


def test_opening_a_garbage_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.index"
    path.write_bytes(b"this is not a FAISS index" * 10)
    with pytest.raises(InputError, match="garbage.index"):
        InnerProductIndex.open(path)


def test_opening_a_truncated_file_names_the_path(vectors, tmp_path):
    path = tmp_path / "faiss.index"
    build("flat", vectors).save(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="faiss.index"):
        InnerProductIndex.open(path)


def test_dimension_mismatch_names_both_dimensions(vectors):
    index = build("flat", vectors)
    with pytest.raises(InputError, match=f"dimension 7 .*dimension {DIM}"):
        index.search(np.zeros((2, 7), np.float32), 5)
    with pytest.raises(InputError, match=f"dimension 7 .*dimension {DIM}"):
        index.add(np.zeros((2, 7), np.float32))


def test_unknown_index_type_lists_the_known_ones():
    with pytest.raises(InputError, match="flat, flat-fp16, ivf, hnsw"):
        InnerProductIndex.create(DIM, "annoy")


def test_a_1d_query_is_one_query(vectors, queries):
    index = build("flat", vectors)
    result = index.search(queries[0], 5)
    assert result.rows.shape == (1, 5)
    np.testing.assert_array_equal(result.rows[0], index.search(queries, 5).rows[0])


def test_k_larger_than_ntotal_is_clamped(vectors, queries):
    index = build("flat", vectors[:7])
    result = index.search(queries, 50)
    assert result.rows.shape == (20, 7) and result.scores.shape == (20, 7)
    assert all(sorted(row) == list(range(7)) for row in result.rows.tolist())
    assert InnerProductIndex.create(DIM).search(queries, 5).rows.shape == (20, 0)


def test_non_finite_vectors_are_refused(vectors):
    bad = vectors[:5].copy()
    bad[2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        InnerProductIndex.create(DIM).add(bad)


@pytest.mark.skipif(gpu_available(), reason="FAISS sees a GPU here (tests/test_gpu.py checks it)")
def test_no_gpu_here_and_to_gpu_returns_a_working_index(vectors, queries):
    index = build("flat", vectors)
    moved = index.to_gpu()
    assert not moved.on_gpu
    np.testing.assert_array_equal(moved.search(queries, 10).rows, brute_force(vectors, queries, 10)[1])


@pytest.mark.skipif(gpu_available(), reason="FAISS sees a GPU here")
def test_opening_with_use_gpu_true_without_a_gpu_is_refused(vectors, tmp_path):
    path = tmp_path / "faiss.index"
    build("flat", vectors).save(path)
    with pytest.raises(InputError, match="GPU"):
        InnerProductIndex.open(path, use_gpu=True)
    assert not InnerProductIndex.open(path).on_gpu


class FakeGpuIndex:
    """Stands in for a FAISS GPU index: a CPU clone that counts its searches."""

    def __init__(self, index):
        self.index = faiss.clone_index(index)
        self.searches = 0

    def add(self, vectors):
        self.index.add(vectors)

    def search(self, queries, k):
        self.searches += 1
        return self.index.search(queries, k)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend FAISS has a GPU, to check what goes where (the real GPU path is checked on a GPU machine)."""
    import tracin_index.search as search_module

    clones = []

    def index_cpu_to_gpu(resources, device, index, options):
        assert device == 0 and options.use_cuvs is False
        clones.append(FakeGpuIndex(index))
        return clones[-1]

    class ClonerOptions:
        use_cuvs = True

    monkeypatch.setattr(search_module, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    return clones


def test_on_a_gpu_searches_use_it_up_to_its_k_limit_and_the_cpu_beyond(fake_gpu, tmp_path):
    data = np.random.default_rng(3).standard_normal((3000, 8)).astype(np.float32)
    index = InnerProductIndex.create(8).to_gpu()
    assert index.on_gpu and len(fake_gpu) == 1
    index.add(data)
    assert fake_gpu[0].index.ntotal == index.ntotal == 3000  # both copies receive the rows
    index.search(data[:2], 10)
    assert fake_gpu[0].searches == 1
    result = index.search(data[:2], 2500)  # beyond GPU_MAX_K: the kept CPU index answers
    assert fake_gpu[0].searches == 1 and result.rows.shape == (2, 2500)
    index.save(tmp_path / "faiss.index")
    assert InnerProductIndex.open(tmp_path / "faiss.index", use_gpu=True).on_gpu


def test_hnsw_stays_on_the_cpu_even_with_a_gpu(fake_gpu, vectors):
    assert not build("hnsw", vectors[:100]).to_gpu().on_gpu
    assert fake_gpu == []


@pytest.mark.parametrize("index_type", ["flat", "flat-fp16"])
def test_reserve_keeps_the_storage_in_place_through_adds_in_pieces(index_type):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    index = InnerProductIndex.create(16, index_type)
    index.reserve(len(vectors))
    assert index.ntotal == 0
    addresses = set()
    for start in range(0, len(vectors), 50):
        index.add(vectors[start : start + 50])
        addresses.add(int(index._cpu.codes.data()))
    assert index.ntotal == len(vectors) and len(addresses) == 1
    _, expected = brute_force(vectors, vectors[:5], 3)
    np.testing.assert_array_equal(index.search(vectors[:5], 3).rows, expected)


def test_reserve_is_a_no_op_for_the_other_types():
    for index_type in ("ivf", "hnsw"):
        index = InnerProductIndex.create(16, index_type)
        index.reserve(1000)
        assert index.ntotal == 0


def test_ivf_lists_sized_in_advance_hold_what_plain_adds_hold(vectors, queries):
    plain = build("ivf", vectors, nlist=8, nprobe=8)
    sized = InnerProductIndex.create(vectors.shape[1], "ivf", nlist=8, nprobe=8)
    sized.train(vectors)
    lists = np.concatenate([sized.assign(vectors[:700]), sized.assign(vectors[700:])])
    sized.reserve(len(vectors), list_sizes=np.bincount(lists, minlength=8))
    assert sized.ntotal == 0
    for start in range(0, len(vectors), 300):
        sized.add(vectors[start : start + 300], lists=lists[start : start + 300])
    invlists = sized._cpu.invlists
    assert [invlists.list_size(i) for i in range(8)] == np.bincount(lists, minlength=8).tolist()
    expected = plain.search(queries, 10)
    np.testing.assert_array_equal(sized.search(queries, 10).rows, expected.rows)
    np.testing.assert_allclose(sized.search(queries, 10).scores, expected.scores, rtol=1e-6)


def test_assign_and_list_sizes_are_checked(vectors):
    with pytest.raises(InputError, match="trained ivf"):
        InnerProductIndex.create(vectors.shape[1], "flat").assign(vectors)
    index = InnerProductIndex.create(vectors.shape[1], "ivf", nlist=4)
    with pytest.raises(InputError, match="trained ivf"):
        index.assign(vectors)
    index.train(vectors)
    with pytest.raises(InputError, match="list_sizes"):
        index.reserve(len(vectors), list_sizes=np.array([1, 2, 3, 4]))
    with pytest.raises(InputError, match="one list number"):
        index.add(vectors[:3], lists=np.array([0, 1]))


@pytest.mark.parametrize("index_type", INDEX_TYPES)
@pytest.mark.parametrize("num_queries", [1, 20])  # one FAISS call, two calls
def test_search_both_equals_search_and_search_opponents(index_type, num_queries, vectors, queries):
    index = build(index_type, vectors)
    queries = queries[:num_queries]
    proponents, opponents = index.search_both(queries, 10)
    np.testing.assert_array_equal(proponents.rows, index.search(queries, 10).rows)
    np.testing.assert_array_equal(opponents.rows, index.search_opponents(queries, 10).rows)
    np.testing.assert_allclose(opponents.scores, index.search_opponents(queries, 10).scores, rtol=1e-6)
    _, expected = brute_force(vectors, queries, 10, largest=False)
    if index_type.startswith("flat"):
        np.testing.assert_array_equal(opponents.rows, expected)
