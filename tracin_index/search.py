"""The FAISS inner-product index over per-example gradient vectors.

Row ``i`` of the index is training triple ``i``; its vector is the concatenation over checkpoints
of ``sqrt(lr_c) * proj(g(z_i; theta_c))``, so that one inner product with a test vector built the
same way is the whole TracInCP score

    influence(z_i, z_test) = < v(z_i), v(z_test) >.

Proponents are the largest inner products (maximum inner-product search); opponents the most
negative, found by searching with the negated query (exact for the flat types, approximate like
every other search for ``ivf`` and ``hnsw``).

An :class:`InnerProductIndex` is a value in the FAISS manner: create (and train) it, ``add`` vectors
in row order, ``save`` it, ``open`` it again, move it to a GPU and search it. Everything works on
faiss-cpu; a GPU is used when FAISS was built with one and torch sees CUDA.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import faiss
import numpy as np

from tracin_index.errors import InputError
from tracin_index.files import write_atomic

__all__ = ["INDEX_TYPES", "InnerProductIndex", "SearchResult", "gpu_available"]

PathLike = str | os.PathLike[str]

INDEX_TYPES = ("flat", "flat-fp16", "ivf", "hnsw")

# FAISS's classic GPU kernels select at most 2048 neighbours and probe at most 2048 lists (before
# FAISS 1.7.3: fewer than 2048). Larger searches run on the kept CPU index.
GPU_MAX_K = 2047
_GPU_DEVICE = 0
# Types FAISS can clone to a GPU: flat-fp16 becomes a GpuIndexFlat with float16 storage.
_GPU_TYPES = ("flat", "flat-fp16", "ivf")


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no truth value to compare by
class SearchResult:
    """The k best training rows per query, best first.

    ``scores[q, j]`` is the inner product of query ``q`` with training row ``rows[q, j]``. Where an
    approximate index finds fewer than k rows, ``rows`` is -1 and ``scores`` is NaN.
    """

    scores: np.ndarray  # (num_queries, k) float32, inner products
    rows: np.ndarray  # (num_queries, k) int64 training rows; -1 where fewer than k results


def gpu_available() -> bool:
    """True when FAISS was built with GPU support, sees a GPU, and torch sees CUDA. Never raises."""
    try:
        if not (hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources")):
            return False
        if faiss.get_num_gpus() <= 0:
            return False
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install means "no GPU", not a crash
        return False


def default_nlist(num_vectors: int) -> int:
    """Number of IVF lists for ``num_vectors`` training vectors: 4 sqrt(n), clamped to [1, 4096]."""
    return int(max(1, min(4096, 4 * math.sqrt(num_vectors))))


def default_nprobe(nlist: int) -> int:
    """Lists probed per IVF search unless told otherwise: one eighth of them."""
    return max(1, nlist // 8)


class InnerProductIndex:
    """A FAISS inner-product index; a value you build, save, open, move to a GPU and search.

    Types (``INDEX_TYPES``):

    - ``flat``: ``IndexFlatIP``, exact over the stored float32 vectors.
    - ``flat-fp16``: exhaustive over vectors stored as float16 (half the memory, nearly exact).
    - ``ivf``: ``IndexIVFFlat``, probes ``nprobe`` of ``nlist`` k-means lists; needs :meth:`train`.
    - ``hnsw``: ``IndexHNSWFlat`` graph search with ``ef_search`` candidates; CPU only.

    The object always holds the CPU index; after :meth:`to_gpu` it holds a GPU clone as well,
    which searches while the CPU index serves searches beyond the GPU's k limit and :meth:`save`.
    """

    def __init__(self, index: faiss.Index, index_type: str):
        _check_index_type(index_type)
        if _is_gpu_index(index):
            self._cpu = faiss.index_gpu_to_cpu(index)
            self._gpu: faiss.Index | None = index
        else:
            self._cpu = index
            self._gpu = None
        self._gpu_resources = None  # the StandardGpuResources the GPU clone lives in, when we made it
        self._index_type = index_type
        # ivf created without nlist: the CPU index is an empty placeholder until train() chooses nlist.
        self._nlist_deferred = False
        self._requested_nprobe: int | None = None

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        dim: int,
        index_type: str = "flat",
        *,
        nlist: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nprobe: int | None = None,
    ) -> InnerProductIndex:
        """An empty index for ``dim``-dimensional vectors.

        ``nlist`` and ``nprobe`` concern ``ivf`` only: without ``nlist``, :meth:`train` chooses
        ``default_nlist(len(sample))``; without ``nprobe``, ``default_nprobe(nlist)``.
        ``hnsw_m`` (graph degree) and ``ef_search`` concern ``hnsw`` only.
        """
        _check_index_type(index_type)
        _check_positive("dim", dim)
        ip = faiss.METRIC_INNER_PRODUCT
        if index_type == "flat":
            return cls(faiss.IndexFlatIP(dim), index_type)
        if index_type == "flat-fp16":
            return cls(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip), index_type)
        if index_type == "hnsw":
            _check_positive("hnsw_m", hnsw_m)
            _check_positive("ef_search", ef_search)
            index = faiss.IndexHNSWFlat(dim, hnsw_m, ip)
            index.hnsw.efSearch = ef_search
            return cls(index, index_type)
        # ivf
        if nprobe is not None:
            _check_positive("nprobe", nprobe)
        if nlist is None:
            result = cls(_make_ivf(dim, 1), index_type)
            result._nlist_deferred = True
            result._requested_nprobe = nprobe
            return result
        _check_positive("nlist", nlist)
        index = _make_ivf(dim, nlist)
        index.nprobe = nprobe if nprobe is not None else default_nprobe(nlist)
        return cls(index, index_type)

    def train(self, sample: np.ndarray) -> None:
        """Train an ``ivf`` index (k-means for its lists) on a sample of the vectors; no-op for the others.

        Train before :meth:`add`. Training runs on the CPU; a GPU clone is remade afterwards.
        """
        if self._index_type != "ivf":
            return
        sample = _as_matrix(sample, self.dim, "the training sample")
        if self.ntotal > 0:
            raise InputError(
                f"this ivf index already holds {self.ntotal} vectors; train a new index before adding vectors"
            )
        num_vectors = sample.shape[0]
        if self._nlist_deferred:
            nlist = default_nlist(num_vectors)
            index = _make_ivf(self.dim, nlist)
            # nlist was chosen from this sample's size, so FAISS's "too few points per list" warning is expected noise.
            index.cp.min_points_per_centroid = 1
            index.nprobe = self._requested_nprobe if self._requested_nprobe is not None else default_nprobe(nlist)
        else:
            index = self._cpu
            nlist = index.nlist
        if num_vectors < nlist:
            raise InputError(
                f"the training sample has {num_vectors} vectors but the ivf index has {nlist} lists; "
                f"give at least {nlist} vectors or a smaller nlist"
            )
        index.train(sample)
        self._cpu = index
        self._nlist_deferred = False
        if self._gpu is not None:
            self._clone_to_gpu()

    def add(self, vectors: np.ndarray, *, lists: np.ndarray | None = None) -> None:
        """Append vectors as the next rows, in order. Call repeatedly with chunks to stream a large set.

        The chunk is converted to C-contiguous float32 only if it is not already; nothing else is copied
        (beyond what FAISS stores). ``lists`` (``ivf``): their lists, from :meth:`assign`, not searched again.
        """
        vectors = _as_matrix(vectors, self.dim, "the vectors to add")
        if self.needs_training:
            raise InputError("this ivf index is not trained; call train() on a sample of the vectors before add()")
        if vectors.shape[0] == 0:
            return
        if lists is None or self._index_type != "ivf":
            self._cpu.add(vectors)
        else:
            lists = np.ascontiguousarray(lists, dtype=np.int64)
            if lists.shape != (vectors.shape[0],) or lists.min() < 0 or lists.max() >= self.nlist:
                raise InputError(f"lists must hold one list number in 0..{self.nlist - 1} per vector")
            self._cpu.add_core(len(vectors), faiss.swig_ptr(vectors), None, faiss.swig_ptr(lists))
        if self._gpu is not None:
            self._gpu.add(vectors)

    def reserve(self, num_vectors: int, *, list_sizes: np.ndarray | None = None) -> None:
        """Allocate room for all rows now, so that adds in many pieces never copy what is stored and
        leave no spare capacity (FAISS's storage grows like a ``std::vector``, doubling).

        Flat types: ``num_vectors`` rows. ``ivf``: ``list_sizes[l]`` rows in list ``l`` (count the
        :meth:`assign` results), then :meth:`add` with ``lists``. A no-op for ``hnsw``, for an index
        that already holds rows, and wherever this FAISS does not expose its storage.
        """
        if self.ntotal or num_vectors < 1:
            return
        # growing a std::vector from empty allocates exactly; shrinking it again keeps that capacity
        if self._index_type == "ivf" and list_sizes is not None and not self.needs_training:
            if len(list_sizes) != self.nlist or int(np.sum(list_sizes)) != num_vectors:
                raise InputError(f"list_sizes must give {self.nlist} lists holding {num_vectors} rows in all")
            invlists = self._cpu.invlists
            for list_no, size in enumerate(np.asarray(list_sizes, dtype=np.int64).tolist()):
                if size:
                    invlists.resize(list_no, size)
                    invlists.resize(list_no, 0)
            return
        codes = getattr(self._cpu, "codes", None)
        if self._index_type in ("flat", "flat-fp16") and hasattr(codes, "resize"):
            codes.resize(num_vectors * self._cpu.code_size)
            codes.resize(0)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The list of a trained ``ivf`` index that each vector goes to (what :meth:`add` would choose)."""
        if self._index_type != "ivf" or self.needs_training:
            raise InputError("assign() needs a trained ivf index")
        vectors = _as_matrix(vectors, self.dim, "the vectors to assign")
        _, lists = self._cpu.quantizer.search(vectors, 1)
        return np.ascontiguousarray(lists[:, 0], dtype=np.int64)

    # -- searching --------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The k training rows of largest inner product with each query (proponents), descending.

        A 1-D query is one query. ``k`` larger than the number of rows is clamped to it, so the
        result has ``min(k, ntotal)`` columns.
        """
        queries = _as_matrix(queries, self.dim, "the queries")
        return self._search(queries, k)

    def search_opponents(self, queries: np.ndarray, k: int) -> SearchResult:
        """The k training rows of most negative inner product with each query (opponents), ascending.

        Searches with the negated queries and negates the scores back, so ``scores`` are the true
        inner products, most negative first.
        """
        queries = _as_matrix(queries, self.dim, "the queries")
        result = self._search(-queries, k)
        return SearchResult(scores=-result.scores, rows=result.rows)

    def search_both(self, queries: np.ndarray, k: int) -> tuple[SearchResult, SearchResult]:
        """:meth:`search` and :meth:`search_opponents` together.

        FAISS shares the work of a search out among its threads by query, so a few queries go in one
        call with their negations, and each thread has something to do; many queries go in two calls,
        which was a little faster. Measured on 2 cores: one query's proponents and opponents took
        7.6 ms in one call against 12.9 ms in two (ivf, 200k x 1024; flat: 30 against 96 ms); 256
        queries took 8.7 s in one call against 7.9 s in two (ivf, 1M x 1024, nprobe 158).
        """
        queries = _as_matrix(queries, self.dim, "the queries")
        n = len(queries)
        if n >= 2 * max(1, faiss.omp_get_max_threads()):
            return self._search(queries, k), self.search_opponents(queries, k)
        both = self._search(np.concatenate([queries, -queries]), k)
        return (SearchResult(scores=both.scores[:n], rows=both.rows[:n]),
                SearchResult(scores=-both.scores[n:], rows=both.rows[n:]))  # fmt: skip

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if self.needs_training:
            raise InputError("this ivf index is not trained; call train() and add() before searching")
        k = min(int(k), self.ntotal)
        num_queries = queries.shape[0]
        if k == 0 or num_queries == 0:
            empty = (num_queries, k)
            return SearchResult(scores=np.empty(empty, np.float32), rows=np.empty(empty, np.int64))
        scores, rows = self._searcher(k).search(queries, k)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        scores[rows < 0] = np.nan
        return SearchResult(scores=scores, rows=rows)

    def _searcher(self, k: int) -> faiss.Index:
        """The GPU clone, unless the search is beyond what the GPU kernels allow."""
        if self._gpu is None or k > GPU_MAX_K:
            return self._cpu
        if self._index_type == "ivf" and self._cpu.nprobe > GPU_MAX_K:
            return self._cpu
        return self._gpu

    # -- saving and opening -----------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the CPU index to ``path`` atomically: a temporary file in the same folder, then a rename."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"cannot save the index to {path}: folder {folder} does not exist")
        # The kept CPU index, not index_gpu_to_cpu: a GPU flat-fp16 clone would come back as float32 IndexFlat.
        write_atomic(path, lambda temporary: faiss.write_index(self._cpu, str(temporary)), fsync=True)

    @classmethod
    def open(
        cls, path: PathLike, *, index_type: str | None = None, use_gpu: bool | None = None
    ) -> InnerProductIndex:
        """Read an index written by :meth:`save` (or any FAISS inner-product index of a known type).

        ``index_type`` None infers it from the file; given, it must match. ``use_gpu`` None moves the
        index to the GPU when :func:`gpu_available` (falling back to the CPU with a warning if FAISS
        cannot); True requires a GPU; False keeps it on the CPU.
        """
        path = os.fspath(path)
        if index_type is not None:
            _check_index_type(index_type)
        if not os.path.isfile(path):
            raise InputError(f"no FAISS index at {path}: build the index first, or check the path")
        try:
            index = faiss.read_index(path)
        except Exception as error:  # FAISS raises RuntimeError for truncated or foreign files
            raise InputError(
                f"cannot read the FAISS index {path} (truncated or not a FAISS index: rebuild it): {error}"
            ) from error
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError(f"the FAISS index {path} does not use inner products; rebuild it with this package")
        found = _infer_index_type(index)
        if found is None:
            raise InputError(
                f"the FAISS index {path} is a {type(index).__name__}, not one of {', '.join(INDEX_TYPES)}; rebuild it"
            )
        if index_type is not None and index_type != found:
            raise InputError(f"the FAISS index {path} is of type {found!r}, not {index_type!r} as requested")
        return cls(index, found).place(use_gpu, what=path)

    def place(self, use_gpu: bool | None = None, *, what: str = "the index") -> InnerProductIndex:
        """Where searches run: ``use_gpu`` None moves the index to the GPU when :func:`gpu_available`
        (falling back to the CPU with a warning if FAISS cannot); True requires a GPU; False keeps it
        on the CPU. Returns this index.
        """
        if use_gpu is None:
            if gpu_available() and self._index_type in _GPU_TYPES:
                try:
                    self.to_gpu()
                except Exception as error:  # e.g. out of GPU memory: the CPU still answers
                    warnings.warn(f"searching {what} on the CPU: FAISS could not move it to the GPU ({error})")
        elif use_gpu:
            if not gpu_available():
                raise InputError(
                    "use_gpu=True but no GPU is usable (FAISS needs a GPU build and torch must see CUDA); "
                    "use use_gpu=None or False"
                )
            self.to_gpu()
        return self

    # -- the GPU ----------------------------------------------------------------------------------

    def to_gpu(self) -> InnerProductIndex:
        """Move this index to GPU 0 (in place) and return it; without a usable GPU, or for ``hnsw``
        (FAISS has no GPU HNSW), return it unchanged. The CPU index is kept.
        """
        if self._gpu is None and gpu_available() and self._index_type in _GPU_TYPES:
            self._clone_to_gpu()
        return self

    def _clone_to_gpu(self) -> None:
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        if hasattr(options, "use_cuvs"):
            # The classic kernels: flat-fp16 has no cuVS version, and GPU_MAX_K is theirs.
            options.use_cuvs = False
        nprobe = self.nprobe if self._index_type == "ivf" and not self._nlist_deferred else None
        if nprobe is not None and nprobe > GPU_MAX_K:  # the GPU clone refuses it; the CPU answers such searches
            self._cpu.nprobe = GPU_MAX_K
        try:
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, _GPU_DEVICE, self._cpu, options)
        finally:
            if nprobe is not None:
                self._cpu.nprobe = nprobe

    # -- properties -------------------------------------------------------------------------------

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def dim(self) -> int:
        return int(self._cpu.d)

    @property
    def ntotal(self) -> int:
        """Number of rows (training triples) in the index."""
        return int(self._cpu.ntotal)

    @property
    def needs_training(self) -> bool:
        return not self._cpu.is_trained

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def nlist(self) -> int | None:
        """Number of IVF lists; None for the other types and for an ivf index whose train() will choose it."""
        if self._index_type != "ivf" or self._nlist_deferred:
            return None
        return int(self._cpu.nlist)

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per search (more: better recall, slower); None for the other types."""
        if self._index_type != "ivf":
            return None
        if self._nlist_deferred:
            return self._requested_nprobe
        return int(self._cpu.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._index_type != "ivf":
            raise InputError(f"nprobe applies to ivf indexes, not {self._index_type!r}")
        _check_positive("nprobe", value)
        if self._nlist_deferred:
            self._requested_nprobe = int(value)
            return
        self._cpu.nprobe = int(value)
        if self._gpu is not None:
            gpu_nprobe = min(int(value), GPU_MAX_K)  # beyond it, _searcher answers on the CPU
            if hasattr(self._gpu, "setNumProbes"):  # FAISS before 1.7.3
                self._gpu.setNumProbes(gpu_nprobe)
            else:
                self._gpu.nprobe = gpu_nprobe

    @property
    def ef_search(self) -> int | None:
        """HNSW candidates kept per search (more: better recall, slower); None for the other types."""
        if self._index_type != "hnsw":
            return None
        return int(self._cpu.hnsw.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self._index_type != "hnsw":
            raise InputError(f"ef_search applies to hnsw indexes, not {self._index_type!r}")
        _check_positive("ef_search", value)
        self._cpu.hnsw.efSearch = int(value)

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"InnerProductIndex(type={self._index_type!r}, dim={self.dim}, ntotal={self.ntotal}, on={where})"


def _make_ivf(dim: int, nlist: int) -> faiss.Index:
    # The Python wrapper keeps the quantizer alive as long as the IVF index.
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)


def _infer_index_type(index: faiss.Index) -> str | None:
    # Most specific first: IndexHNSWFlat is not an IndexFlat, but check it before the flat types anyway.
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return "flat-fp16"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    return None


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _check_index_type(index_type: str) -> None:
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _as_matrix(array: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``array`` as a C-contiguous float32 (n, dim) matrix (a 1-D array is one row); copies only if needed."""
    array = np.asarray(array)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (rows x {dim}), got shape {array.shape}")
    if array.shape[1] != dim:
        raise InputError(f"{what} have dimension {array.shape[1]} but the index has dimension {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return array
