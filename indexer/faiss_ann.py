"""faiss approximate indexes behind `ShardIndex`: build from a factory string, id handling, search parameters.

Every index is inner product and keyed by slot (see `ShardIndex`). IVF indexes
take slot ids natively, with a hash-table direct map so a delete removes in
O(1); everything else is wrapped in `IndexIDMap`. Whether an index can remove
ids (HNSW cannot) is probed, not assumed: the caller tombstones where it cannot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import structlog

import faiss

from feedret.indexer.stores import bitmap_selector

log = structlog.get_logger(__name__)

# The largest k (and nprobe) a faiss GPU index selects (GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048


class IndexConfigError(ValueError):
    """The index configuration cannot work (bad factory string, unsupported type, widths)."""


# Index types whose search ignores or refuses an IDSelector, so a filter could not
# run inside the search, or that cannot add vectors after they are built.
_UNSUPPORTED = tuple(
    t
    for t in (
        getattr(faiss, name, None)
        for name in ("IndexPQ", "IndexPQFastScan", "IndexAdditiveQuantizer", "IndexNSG", "IndexLSH", "IndexNNDescent")
    )
    if t is not None
)


def use_threads(n: int) -> None:
    """Let faiss searches on the calling thread use n OpenMP threads.

    The count is per thread (libgomp keeps it in the caller's task), so a search thread
    set to 1 leaves the background build and rebuild threads on every core. Without it
    a single HNSW query ran a second thread that doubled its CPU and slowed it down.
    """
    faiss.omp_set_num_threads(n)


def _chain(index: faiss.Index) -> list[faiss.Index]:
    """The index and every index it wraps, outermost first."""
    out = []
    ix = faiss.downcast_index(index)
    while ix is not None:
        out.append(ix)
        if isinstance(ix, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
            ix = faiss.downcast_index(ix.index)
        elif isinstance(ix, faiss.IndexRefine):
            ix = faiss.downcast_index(ix.base_index)
        else:
            ix = None
    return out


def adds_slowly(index: faiss.Index) -> bool:
    """True for graph indexes (HNSW, NSG), whose add links each vector into the graph:
    ~80 ms for 256 vectors at 1M × 256 here, against well under a millisecond for IVF."""
    return any(isinstance(ix, (faiss.IndexHNSW, faiss.IndexNSG)) for ix in _chain(index))


def _growable_vectors(index: faiss.Index) -> list:
    """The arrays of an index that grow with every add and are large enough to matter."""
    out = []
    for ix in _chain(index):
        if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            out.append(ix.id_map)
        if isinstance(ix, faiss.IndexHNSW):
            out += [ix.hnsw.neighbors, ix.hnsw.levels, ix.hnsw.offsets]
            storage = faiss.downcast_index(ix.storage)
            if isinstance(storage, faiss.IndexFlatCodes):
                out.append(storage.codes)
        elif isinstance(ix, faiss.IndexFlatCodes):
            out.append(ix.codes)
    return out


def reserve_headroom(index: faiss.Index, fraction: float = 0.5) -> None:
    """Room for `fraction` more adds in an index loaded from a snapshot, without a reallocation.

    Deserialized faiss arrays are sized exactly, so the first add after a restore
    reallocated and copied all of them, under the shard's write lock: a 3.4 s search
    stall for HNSW32 at 1M × 256 on the benchmark machine (1.3 ms with the headroom).
    Growing a std::vector and shrinking it back keeps its capacity, so this moves that
    cost to the load, before the shard serves. IVF lists are small and grow one by one.
    """
    for vec in _growable_vectors(index):
        n = int(vec.size())
        if n:
            vec.resize(int(n * (1 + fraction)))
            vec.resize(n)


def new_index(factory: str, dimension: int) -> faiss.Index:
    """A fresh, empty inner-product index from a factory string; IndexConfigError when unusable."""
    spec = factory.strip()
    if spec.lower().startswith("idmap"):
        raise IndexConfigError(f"index factory {factory!r}: leave out IDMap, the shard maps post ids itself")
    try:
        index = faiss.index_factory(dimension, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexConfigError(f"faiss cannot build index {factory!r} at dimension {dimension}: {reason}") from exc
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexConfigError(f"index {factory!r} does not support inner product")
    for part in _chain(index):
        if isinstance(part, _UNSUPPORTED):
            raise IndexConfigError(
                f"index {factory!r} ({type(part).__name__}) cannot filter inside its search or add after "
                "building; use IVF…, HNSW…, SQ… or Flat"
            )
    return index


def is_ivf_rooted(index: faiss.Index) -> bool:
    """True when add_with_ids reaches an IVF directly (IVF, or transforms in front of one)."""
    chain = _chain(index)
    return isinstance(chain[-1], faiss.IndexIVF) and all(
        isinstance(p, faiss.IndexPreTransform) for p in chain[:-1]
    )


def default_train_size(index: faiss.Index) -> int:
    """How many vectors to train on when not configured: ~40 per centroid, the faiss guideline."""
    centroids = 1
    for part in _chain(index):
        if isinstance(part, faiss.IndexIVF):
            centroids = max(centroids, part.nlist)
        pq = getattr(part, "pq", None)
        if pq is not None and hasattr(pq, "ksub"):
            centroids = max(centroids, pq.ksub)
    return max(1000, 40 * centroids)


def nlist_of(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def search_breadth(nlist: int, ntotal: int, k: int, passing: float,
                   nprobe: int, ef_search: int) -> tuple[int, int]:
    """(nprobe, efSearch) for a top-k search of an index of `nlist` IVF lists (0: not an
    IVF; `nlist_of`, which a built `Ann` keeps) holding `ntotal` vectors, where a fraction
    `passing` of them pass the filter.

    The configured `nprobe` and `ef_search` are floors. IVF probes enough lists to see
    about 4k candidates (k=2,000 of 1M posts in 4,096 lists needs 33 lists, not 16);
    HNSW looks at least k deep. Both widen by 1/passing (at most 20x): a filter letting
    10% through needs 10x the candidates for the same recall, which a selector alone
    does not give (measured: IVF recall@100 0.53 -> 0.96, HNSW 0.22 -> 0.80).
    """
    scale = min(1.0 / max(passing, 1e-9), 20.0)
    if nlist:
        nprobe = max(nprobe, int(np.ceil(4 * k * nlist / max(ntotal, 1))))
    return int(np.ceil(nprobe * scale)), int(np.ceil(max(ef_search, k) * scale))


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, or faiss-gpu on a machine without one."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


# IVF types faiss can copy to a GPU (GpuIndexIVFFlat, GpuIndexIVFScalarQuantizer, GpuIndexIVFPQ).
_GPU_IVF = tuple(
    t for t in (getattr(faiss, n, None) for n in ("IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ"))
    if t is not None
)


def why_not_on_gpu(index: faiss.Index) -> str:
    """'' when a GPU mirror can serve this index's searches, else why it cannot."""
    chain = _chain(index)
    if len(chain) == 1 and isinstance(chain[0], _GPU_IVF):
        return ""
    return (f"faiss has no GPU version of {' over '.join(type(p).__name__ for p in chain)} "
            "(IVF…,Flat, IVF…,SQ… and IVF…,PQ… have one)")


@dataclass
class MirrorCounts:
    """Searches GPU copies answered, and those they passed to the CPU index; a shard keeps one
    across its rebuilds (Stats, /metrics). Approximate under concurrency: the GIL, no lock."""

    answered: int = 0
    declined: int = 0


class Mirror:
    """A copy of an IVF index on a GPU that answers searches; the CPU index stays the source of truth.

    faiss GPU indexes ignore an IDSelector (faiss issues #3114, #3924), cannot
    remove ids and select at most 2,048 results. So a mirror gets the same adds as
    the CPU index and never a removal (the shard tombstones deleted posts and
    rebuilds both, as for HNSW); its results are filtered afterwards with the
    search's mask, from a depth that leaves k after the filter. A search it cannot
    answer that way (k too large, a filter too narrow, too few results passing)
    goes to the CPU index, whose selector filters inside the search: the shard's
    contract (k back whenever k posts pass the filter) holds either way.

    `lock` serialises every call on one GPU: its StandardGpuResources are not
    thread-safe. Tests build a mirror over a CPU clone, which searched without a
    selector behaves the same.
    """

    def __init__(
        self, index: faiss.Index, lock: threading.Lock, device: str, nlist: int, max_k: int = GPU_MAX_K
    ) -> None:
        self.index = index
        self.nlist = nlist
        self.lock = lock
        self.device = device
        self.max_k = max_k
        self.failed = ""
        self.counts = MirrorCounts()

    def add(self, vectors: np.ndarray, slots: np.ndarray) -> None:
        """The CPU index's add, repeated here; a copy that fails it no longer matches and is dropped."""
        if self.failed:
            return
        try:
            with self.lock:
                self.index.add_with_ids(vectors, slots)
        except Exception as exc:  # noqa: BLE001 - the CPU index answers from now on
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("gpu_mirror_failed", device=self.device, op="add")

    def search(
        self, query: np.ndarray, k: int, mask: np.ndarray | None, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Top k of the entries `mask` allows (None: all), or None when the CPU index must answer."""
        return self.search_batch(query.reshape(1, -1), [k], [mask], [nprobe])[0]

    def search_batch(
        self, queries: np.ndarray, ks: list[int], masks: list[np.ndarray | None], nprobes: list[int]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """`search` for several queries in one GPU search: as deep and as broad as the one
        that needs most (a GPU search costs about the same for a batch as for one query)."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(ks)
        depths = [None if self.failed else self._depth(k, mask) for k, mask in zip(ks, masks)]
        todo = [i for i, d in enumerate(depths) if d is not None]
        self.counts.declined += len(ks) - len(todo)
        if not todo:
            return out
        depth = max(depths[i] for i in todo)
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(max(nprobes[i] for i in todo), self.max_k, self.nlist))
        try:
            with self.lock:
                scores, slots = self.index.search(np.ascontiguousarray(queries[todo]), depth, params=params)
        except Exception as exc:  # noqa: BLE001 - the CPU index answers from now on
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("gpu_mirror_failed", device=self.device, queries=len(todo), depth=depth)
            self.counts.declined += len(todo)
            return out
        for row, i in enumerate(todo):
            keep = slots[row] >= 0
            if masks[i] is not None:
                keep[keep] = masks[i][slots[row][keep]]
            found_scores, found = scores[row][keep][: ks[i]], slots[row][keep][: ks[i]]
            if len(found) < ks[i]:
                self.counts.declined += 1  # the filter left too few: the CPU index searches with its selector
                continue
            self.counts.answered += 1
            out[i] = (found_scores.astype(np.float32, copy=False), found)
        return out

    def _depth(self, k: int, mask: np.ndarray | None) -> int | None:
        """How deep to search for k that pass `mask`, or None when the GPU cannot go that deep."""
        if k > self.max_k:
            return None
        if mask is None:
            return k
        # Deep enough that k survive the filter when the allowed entries are spread evenly,
        # with margin; capped at what the GPU selects. A filter so narrow that even that
        # depth is unlikely to leave k goes straight to the CPU index.
        passing = np.count_nonzero(mask) / max(int(self.index.ntotal), 1)
        wanted = int(np.ceil(k / max(passing, 1e-9) * 1.2)) + 16
        if wanted > 4 * self.max_k:
            return None
        return min(wanted, self.max_k)


_gpu_resources: dict[int, tuple] = {}
_gpu_resources_lock = threading.Lock()


def gpu_mirror(index: faiss.Index, device: int) -> Mirror:
    """Copy an IVF index (with its contents) to GPU `device`; IndexConfigError when faiss cannot."""
    reason = why_not_on_gpu(index)
    if reason:
        raise IndexConfigError(reason)
    with _gpu_resources_lock:
        if device not in _gpu_resources:
            _gpu_resources[device] = (faiss.StandardGpuResources(), threading.Lock())
        res, lock = _gpu_resources[device]
    options = faiss.GpuClonerOptions()
    options.indicesOptions = faiss.INDICES_64_BIT  # slots come back as they went in
    with lock:
        copy = faiss.index_cpu_to_gpu(res, device, index, options)
    kind = type(faiss.downcast_index(copy)).__name__
    if not kind.startswith("Gpu"):
        raise IndexConfigError(f"faiss copied {type(index).__name__} to {kind}, not to a GPU index")
    return Mirror(copy, lock, f"cuda:{device}", nlist_of(index))


@dataclass
class Ann:
    """A built (trained) approximate index keyed by slot, with an optional GPU mirror for searches."""

    index: faiss.Index
    removable: bool
    hashtable: bool  # IVF direct map: removal wants an IDSelectorArray
    mirror: Mirror | None = None
    # Fixed for the life of the built index, and each cost a walk through faiss's SWIG
    # wrappers (~30 us a query together, a tenth of an IVF shard's search): its list
    # count, and the unfiltered search parameters per (nprobe, efSearch).
    nlist: int = field(init=False, repr=False, compare=False)
    _plain_params: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.nlist = nlist_of(self.index)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def device(self) -> str:
        return self.mirror.device if self.mirror is not None and not self.mirror.failed else "cpu"

    def add(self, vectors: np.ndarray, slots: np.ndarray) -> None:
        if len(slots):
            vectors = np.ascontiguousarray(vectors, np.float32)
            slots = np.ascontiguousarray(slots, np.int64)
            self.index.add_with_ids(vectors, slots)
            if self.mirror is not None:
                self.mirror.add(vectors, slots)

    def remove(self, slots: np.ndarray) -> int:
        slots = np.ascontiguousarray(slots, np.int64)
        if not len(slots):
            return 0
        if self.hashtable:
            return int(self.index.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots))))
        return int(self.index.remove_ids(faiss.IDSelectorBatch(slots)))

    def search(
        self, query: np.ndarray, k: int, mask: np.ndarray | None, nprobe: int, ef_search: int, gpu: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of the entries `mask` allows (None: every entry); `gpu`: the GPU copy may answer."""
        if gpu and self.mirror is not None:
            found = self.mirror.search(query, k, mask, nprobe)
            if found is not None:
                return found
        scores, slots = self.search_batch(query.reshape(1, -1), k, mask, nprobe, ef_search)
        valid = slots[0] >= 0
        return scores[0][valid], slots[0][valid]

    def search_batch(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None, nprobe: int, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k of every query among the entries `mask` allows, on the CPU index, in one faiss
        call: (B, k) scores and slots, -1 slots where fewer were found. faiss spreads a batch's
        queries over its threads and IVF assigns them to lists in one product."""
        ef_search = max(ef_search, k)
        if mask is None:
            cached = self._plain_params.get((nprobe, ef_search))
            if cached is None:
                # Read-only during a search, so concurrent searches share them; what they point
                # to is kept beside them. A handful of breadths recur (about one per k asked).
                cached = (search_params(self.index, None, nprobe, ef_search, keep := []), keep)
                if len(self._plain_params) < 64:
                    self._plain_params[(nprobe, ef_search)] = cached
            params = cached[0]
        else:
            keep = []
            params = search_params(self.index, bitmap_selector(mask, keep), nprobe, ef_search, keep)
        scores, slots = self.index.search(np.ascontiguousarray(queries, np.float32), k, params=params)
        return scores.astype(np.float32, copy=False), slots


def search_params(index: faiss.Index, sel, nprobe: int, ef_search: int, keep: list):
    """Typed SearchParameters for this index, carrying the selector down to the part that searches.

    `keep` collects the Python objects the C++ parameters point to, so they live
    until the search returns.
    """
    ix = faiss.downcast_index(index)
    if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        # The wrapped index sees positions, the selector speaks slots: translate here, where
        # it reaches nested parameters too (IndexIDMap itself only translates the outer `sel`).
        if sel is not None:
            sel = faiss.IDSelectorTranslated(ix.id_map, sel)
            keep.append(sel)
        return search_params(ix.index, sel, nprobe, ef_search, keep)
    if isinstance(ix, faiss.IndexPreTransform):
        inner = search_params(ix.index, sel, nprobe, ef_search, keep)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
    elif isinstance(ix, faiss.IndexRefine):
        inner = search_params(ix.base_index, sel, nprobe, ef_search, keep)
        params = faiss.IndexRefineSearchParameters()
        params.base_index_params = inner
        params.k_factor = ix.k_factor
    elif isinstance(ix, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(nprobe, ix.nlist))
        if sel is not None:
            params.sel = sel
        if isinstance(ix.quantizer, faiss.Index):
            quantizer = faiss.downcast_index(ix.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                qp = faiss.SearchParametersHNSW()
                qp.efSearch = max(ef_search, params.nprobe)
                params.quantizer_params = qp
                keep.append(qp)
    elif isinstance(ix, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search
        if sel is not None:
            params.sel = sel
    else:
        params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
    keep.append(params)
    if sel is not None:
        keep.append(sel)
    return params


def with_mirror(ann: Ann, mirror: Mirror) -> Ann:
    """The same index, searched through `mirror`, which must hold the same entries.

    A mirror cannot remove ids, so neither may the index any more: the shard
    tombstones deletions instead, keeping the two entry for entry the same.
    """
    return Ann(index=ann.index, removable=False, hashtable=ann.hashtable, mirror=mirror)


def build_ann(trained: faiss.Index, mirrored: bool = False) -> Ann:
    """Wrap a trained, empty index so it is keyed by slot; probe whether it can remove ids.

    `mirrored`: a GPU mirror will serve it, so it will never remove ids and needs
    no direct map.
    """
    index = faiss.clone_index(trained)
    if mirrored and is_ivf_rooted(index):
        return Ann(index=index, removable=False, hashtable=False)
    hashtable = False
    if is_ivf_rooted(index):
        ivf = faiss.extract_index_ivf(index)
        try:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            hashtable = True
        except RuntimeError:
            hashtable = False
    else:
        index = faiss.IndexIDMap(index)
    ann = Ann(index=index, removable=True, hashtable=hashtable)
    probe = np.array([np.iinfo(np.int64).max], np.int64)
    try:
        ann.remove(probe)
    except RuntimeError:
        if hashtable:  # e.g. fast-scan IVF: no removal through a hash table, try without one
            faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.NoMap)
            ann.hashtable = False
            try:
                ann.remove(probe)
            except RuntimeError:
                ann.removable = False
        else:
            ann.removable = False
    return ann


def describe(ann: Ann) -> str:
    return type(faiss.downcast_index(_chain(ann.index)[-1])).__name__
