"""One shard's vector index: post ids → vectors, with upsert, delete, filters and retention.

Neither faiss nor torch ever sees post ids. They see *slots*: small dense
integers this class hands out and recycles. Per-post attributes (creation time,
language) live in flat numpy arrays indexed by slot, so a filter is a
vectorised mask over slots, applied inside the search (an `IDSelectorBitmap`
for faiss, a masked top-k for torch), not after it: when at least k posts pass
the filter, k come back.

Layout:

- a *store* (`stores.py`) holds every live vector by slot and searches it
  exactly. For `Flat` (faiss) and the torch backend it is the whole index.
- any other faiss factory string (`IVF…,Flat`, `IVF…,PQ…`, `HNSW…`, `SQ8`, …)
  adds an approximate index keyed by slot (`faiss_ann.py`). One that needs
  training trains in a background thread once `train_size` vectors have
  arrived; until it is swapped in, every post is searched exactly in the store,
  so new posts are searchable at once and searches never wait on training.
- HNSW cannot remove ids: a deleted or replaced post leaves a *tombstone* in
  the graph, which every search excludes through its selector, and whose slot
  is not reused until a background rebuild (once tombstones exceed
  `rebuild_fraction` of the index) drops it. Deleted posts never come back.
- a background build snapshots the live slots, builds without any lock held
  (searches keep using the old index and the store), catches up with the writes
  made meanwhile, then swaps in under a short write lock.

Thread-safe: searches run concurrently (readers-writer lock); writes are serialised.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, make_dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import structlog

from feedret.config import IndexSettings, is_exact
from feedret.indexer import codecs, faiss_ann
from feedret.indexer.faiss_ann import Ann, IndexConfigError
from feedret.indexer.idmap import IdMap
from feedret.indexer.rwlock import RWLock
from feedret.indexer.stores import TorchStore, _grown, release_free_memory

log = structlog.get_logger(__name__)

BACKENDS = ("faiss", "torch")
_EMPTY = (np.empty(0, np.int64), np.empty(0, np.float32))
# Posts linked into a graph index (HNSW) per write-lock hold: ~5 ms at 1M × 256 here,
# so a search waits at most about that long for ingestion.
_ANN_ADD_STEP = 16
# The build thread adds writes made during a build outside the write lock until
# fewer than this many are left; the rest it adds while holding it, then swaps.
_CATCH_UP_UNDER_LOCK = 1024
_BUILD_CHUNK = 65536

__all__ = ["IndexConfigError", "IndexInfo", "IndexOptions", "PostRecord", "SearchFilter", "ShardIndex"]


@dataclass(frozen=True)
class SearchFilter:
    exclude_post_ids: Sequence[int] = ()
    min_created_at: float | None = None  # Unix seconds; older posts are skipped
    languages: Sequence[str] = ()  # empty: any

    @property
    def is_empty(self) -> bool:
        return not self.exclude_post_ids and self.min_created_at is None and not self.languages


@dataclass(frozen=True)
class PostRecord:
    post_id: int
    created_at: float
    lang: str
    indexed_at: float
    model_version: str = ""  # the model that embedded this post (a shard may hold several mid-rollout)
    vector: np.ndarray | None = None


# IndexOptions' names for the IndexSettings fields named after their variable (FEEDRET_INDEX_BACKEND).
_OPTION_NAMES = {"index_backend": "backend", "index_device": "device"}


def _from_config(cls, config: IndexSettings) -> "IndexOptions":
    """The options a shard's FEEDRET_* variables ask for (a ShardConfig, or any IndexSettings)."""
    return cls(**{_OPTION_NAMES.get(name, name): getattr(config, name) for name in IndexSettings.model_fields})


# A frozen dataclass made from IndexSettings' fields, so each is declared once, in feedret.config
# (its type, default, limits and meaning, and the FEEDRET_* variable that sets it): index_factory,
# backend, device, serve_dimension, train_size, nprobe, ef_search, search_threads,
# rebuild_fraction, exact_filter_fraction, retention_s, vector_codec, codec_train_size, binary_rescore,
# rescore_dir, binary_search. `from_config` maps a ShardConfig onto it.
# IndexOptions(...) itself validates nothing: ShardIndex refuses what cannot work (IndexConfigError).
IndexOptions = make_dataclass(
    "IndexOptions",
    [
        (_OPTION_NAMES.get(name, name), info.annotation, field(default=info.default))
        for name, info in IndexSettings.model_fields.items()
    ]
    + [
        ("background", bool, field(default=True)),  # build in a thread (tests may build inline)
        ("torch_chunk_rows", int, field(default=1 << 20)),  # torch store rows searched per matmul
    ],
    namespace={
        "__module__": __name__,
        "__doc__": "How a shard indexes: IndexSettings' fields (index_backend and index_device as backend "
        "and device), and background and torch_chunk_rows.",
        "from_config": classmethod(_from_config),
    },
    frozen=True,
)


@dataclass(frozen=True)
class IndexInfo:
    """What `ShardIndex.info()` reports; all zero and empty for a shard that has no index yet."""

    index_type: str = ""  # Flat, the factory string, or the torch store's kind
    index_device: str = ""  # where searches run (ShardIndex.device)
    gpu_searches: int = 0  # searches answered by a GPU copy of the index
    gpu_declined: int = 0  # searches a GPU copy declined to the CPU index
    state: str = ""  # exact | buffering | training | ready | rebuilding | failed
    error: str = ""  # why the last build failed
    indexed: int = 0  # live posts
    dimension: int = 0  # the served width
    input_dimension: int = 0  # the vectors' full width
    buffered: int = 0  # live posts not in the approximate index (searched exactly)
    train_size: int = 0
    tombstones: int = 0
    ann_entries: int = 0
    slots: int = 0
    store_rows: int = 0
    vector_codec: str = ""  # what the store keeps a vector as now (float32 while int8 is staged)
    store_bytes: int = 0  # the store's rows in this process's memory (codes; not a disk rescoring store)
    evicted: int = 0
    rebuilds: int = 0


class _Interned:
    """Strings kept per slot as small integer codes: few distinct values (languages, model
    versions) over millions of posts. Code 0 is the empty string. Written under the write lock.

    Codes are int16 in the slots (2 bytes a post, not 4), so at most `LIMIT` names: past it
    `code` answers None and the caller decides (a language is kept as none; a model refused).
    """

    LIMIT = int(np.iinfo(np.int16).max) + 1

    def __init__(self, names: Iterable[str] = ("",)) -> None:
        self.names: list[str] = list(names)
        self.codes: dict[str, int] = {name: code for code, name in enumerate(self.names)}

    def code(self, name: str) -> int | None:
        """The name's code, assigned on first sight; None once `LIMIT` names are known."""
        code = self.codes.get(name)
        if code is None:
            if len(self.names) >= self.LIMIT:
                return None
            code = self.codes[name] = len(self.names)
            self.names.append(name)
        return code

    def known(self, names: Iterable[str]) -> list[int]:
        """Codes of those names seen so far (a filter on a name never seen matches nothing)."""
        return [self.codes[n] for n in names if n in self.codes]


@dataclass
class _Slots:
    """Per-slot attributes, 26 bytes a post (beside 256 int8 codes that is a tenth of it);
    grown as the vector store grows (`stores._grown`)."""

    post_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    created_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    # Seconds from created_at to when the shard applied the post: float32 keeps a fresh post's
    # lag to well under a millisecond (what freshness is measured with); a post indexed years
    # after it was created is dated to within a minute or so.
    indexed_after: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    lang: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # _Interned codes
    model: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # model version code
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    # The approximate index holds an entry labelled with this slot (a tombstone when not alive).
    in_ann: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    NAMES = ("post_id", "created_at", "indexed_after", "lang", "model", "alive", "in_ann")

    def grow(self, capacity: int) -> None:
        for name in self.NAMES:
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)


@dataclass(frozen=True)
class _Plan:
    """How one search is answered, decided under the read lock: exactly, or by the approximate index."""

    k: int  # results wanted: min(k, posts passing the filter)
    mask: np.ndarray  # slots the filter allows
    filtered: bool
    exact: bool
    # The approximate index's part (None when exact): the entries it may return (None: all
    # of them), and its breadth (nprobe, efSearch).
    ann_mask: np.ndarray | None = None
    breadth: tuple[int, int] | None = None


@dataclass
class _Build:
    """A background (re)build of the approximate index."""

    snapshot: np.ndarray  # slots alive when it started
    train: bool
    reason: str
    delta: list = field(default_factory=list)  # slots written since, to add before swapping
    delta_lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


class ShardIndex:
    def __init__(
        self, dimension: int, index_factory: str | None = None, options: IndexOptions | None = None
    ) -> None:
        if dimension < 1:
            raise ValueError("dimension must be >= 1")
        opts = options or IndexOptions()
        if index_factory is not None:
            opts = replace(opts, index_factory=index_factory)
        self.options = opts
        if opts.serve_dimension < 0 or opts.serve_dimension > dimension:
            raise IndexConfigError(
                f"serve_dimension {opts.serve_dimension} must be between 1 and the vectors' width {dimension} (0: full)"
            )
        if opts.backend not in BACKENDS:
            raise IndexConfigError(f"unknown index backend {opts.backend!r}; one of {', '.join(BACKENDS)}")
        self.input_dimension = dimension
        self.dimension = opts.serve_dimension or dimension
        self.index_factory = opts.index_factory

        self._template = None  # trained, empty faiss index the approximate index is cloned from
        self._ann: Ann | None = None
        self._build: _Build | None = None
        self._failed = ""
        self._train_size = 0
        self._gpu: int | None = None  # the GPU a faiss IVF index's search mirror lives on
        self.gpu_searches = faiss_ann.MirrorCounts()  # over every mirror this index has had
        # Flat (feedret.config.is_exact): the store is the whole index, searched exactly, never trained.
        self.exact_only = is_exact(opts.index_factory)
        if opts.vector_codec not in codecs.CODECS:
            raise IndexConfigError(f"unknown vector codec {opts.vector_codec!r}; one of {', '.join(codecs.CODECS)}")
        if opts.backend == "torch":
            if opts.rescore_dir:
                raise IndexConfigError("rescore_dir (binary rescored from disk) is the faiss backend's")
            if opts.vector_codec == "binary" and opts.binary_search == "rabitq":
                raise IndexConfigError("binary_search rabitq is the faiss backend's; the torch backend searches sign bits")
            if not self.exact_only:
                raise IndexConfigError(
                    f"the torch backend is exact brute force: index factory must be Flat, not {opts.index_factory!r}"
                )
            self._store = codecs.new_torch_store(self.dimension, opts.vector_codec, opts.device, opts.torch_chunk_rows,
                                                 train_size=opts.codec_train_size, rescore=opts.binary_rescore)
            self.index_type = self._store.kind
        elif self.exact_only and not opts.rescore_dir and self._flat_on_gpu():
            # Exact search on a GPU is the torch store's: any k, filters inside the search,
            # deletes in place, none of which a faiss GPU Flat index offers.
            self._store = codecs.new_torch_store(self.dimension, opts.vector_codec, opts.device, opts.torch_chunk_rows,
                                                 train_size=opts.codec_train_size, rescore=opts.binary_rescore)
            self.index_type = "Flat"
        else:
            self._store = codecs.new_store(self.dimension, opts.vector_codec, **self._codec_options())
            self.index_type = "Flat" if self.exact_only else opts.index_factory
            if not self.exact_only:
                probe = faiss_ann.new_index(opts.index_factory, self.dimension)
                self._gpu = self._mirror_gpu(probe)
                if probe.is_trained:
                    self._template = probe
                    self._ann = self._new_ann(probe)
                else:
                    nlist = faiss_ann.nlist_of(probe)
                    self._train_size = opts.train_size or faiss_ann.default_train_size(probe)
                    if self._train_size < max(nlist, 1):
                        raise IndexConfigError(
                            f"train_size {self._train_size} is below the {nlist} lists of {opts.index_factory!r}"
                        )

        self._slots = _Slots()
        self._next_slot = 0
        self._free: list[int] = []
        self._slot_of = IdMap()  # post id -> slot
        self._langs = _Interned()
        self._langs_full_logged = False
        self._models = _Interned()  # model versions
        self._lock = RWLock()
        self._grow_lock = threading.Lock()  # one store growth at a time (see _make_room)
        self._version = 0
        self._buffered_cache: tuple[int, np.ndarray | None] = (-1, None)
        self.tombstones = 0
        self.evicted = 0
        self.rebuilds = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def _codec_options(self) -> dict:
        o = self.options
        return {"train_size": o.codec_train_size, "rescore": o.binary_rescore, "rescore_dir": o.rescore_dir,
                "binary_search": o.binary_search}

    @property
    def vector_codec(self) -> str:
        """The codec the store holds vectors in now (float32 while an int8 one is staged)."""
        return codecs.codec_of(self._store)

    def _maybe_encode(self) -> None:
        """Under the write lock: once a staged codec has seen enough vectors, encode the store
        (the float32 rows go; what is written from now on is encoded as it lands)."""
        store = self._store
        if isinstance(store, (codecs.Staged, codecs.TorchStaged)) and len(self._slot_of) >= store.train_size:
            started = time.perf_counter()
            live = np.flatnonzero(self._slots.alive[: self._next_slot])
            self._store = store.encoded(live)
            self._version += 1
            codec = store.codec
            del store
            release_free_memory()
            log.info("store_encoded", codec=codec, rows=self._store.capacity, trained_on=len(live),
                     seconds=round(time.perf_counter() - started, 3))

    def __contains__(self, post_id: int) -> bool:
        return post_id in self._slot_of

    # ------------------------------------------------------------ devices

    def _gpus(self) -> int:
        """GPUs faiss sees (a seam for tests)."""
        return faiss_ann.gpu_count()

    def _flat_on_gpu(self) -> bool:
        """Whether a faiss `Flat` index is served on a GPU: asked for (cuda, cuda:N), or auto where
        faiss sees one and torch does too (asked faiss first: a CPU shard never imports torch)."""
        device = self.options.device
        if device == "cpu":
            return False
        if device == "auto":
            if not self._gpus():
                return False
            import torch

            return torch.cuda.is_available()
        return True  # the torch store says so if there is no such device

    def _mirror_gpu(self, probe) -> int | None:
        """The GPU whose copy of the index answers searches, or None to search on the CPU.

        auto: the first GPU when faiss sees one and has a GPU version of the index;
        cuda / cuda:N: that GPU, or IndexConfigError saying why it cannot be.
        """
        device = self.options.device
        if device == "cpu":
            return None
        gpus = self._gpus()
        reason = faiss_ann.why_not_on_gpu(probe)
        if device == "auto":
            if gpus and reason:
                log.info("index_on_cpu", index_factory=self.index_factory, reason=reason)
            return 0 if gpus and not reason else None
        number = int(device.partition(":")[2] or 0)
        if reason:
            raise IndexConfigError(f"index_device {device!r}: {reason}; set index_device cpu or auto")
        if number >= gpus:
            raise IndexConfigError(
                f"index_device {device!r}: faiss sees {gpus} GPU(s) (the `gpu` extra installs faiss-gpu)"
            )
        return number

    def _mirror_of(self, index) -> faiss_ann.Mirror:
        """A GPU copy of `index` (a seam for tests, which mirror on the CPU)."""
        return faiss_ann.gpu_mirror(index, self._gpu)

    def _mirrored(self, ann: Ann) -> Ann:
        """`ann` searched through a GPU mirror when one is configured; on failure, on the CPU."""
        if self._gpu is None:
            return ann
        try:
            mirror = self._mirror_of(ann.index)
            mirror.counts = self.gpu_searches
            return faiss_ann.with_mirror(ann, mirror)
        except Exception:  # noqa: BLE001 - the CPU index serves, as it would without a GPU
            log.exception("gpu_mirror_unavailable", index_factory=self.index_factory, gpu=self._gpu)
            return ann

    def _new_ann(self, template) -> Ann:
        return self._mirrored(faiss_ann.build_ann(template, mirrored=self._gpu is not None))

    @property
    def device(self) -> str:
        """Where searches run: cpu, a torch device, or cuda:N for a faiss GPU mirror."""
        if isinstance(self._store, TorchStore):  # only ever the whole (exact) index
            return str(self._store.device)
        ann = self._ann
        return ann.device if ann is not None else "cpu"

    # ------------------------------------------------------------ widths

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Rows of the served width: full-width rows are truncated (Matryoshka) and re-normalised.

        Rows already of the served width are re-normalised too when serving a
        prefix, so a query scores the same whichever width it came in.
        ValueError for any other width.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors.reshape(1, -1)
        width = vectors.shape[1]
        if width not in (self.input_dimension, self.dimension):
            raise ValueError(f"vector has {width} dimensions, the index takes {self.input_dimension}"
                             + (f" or {self.dimension}" if self.dimension != self.input_dimension else ""))
        if self.dimension == self.input_dimension:
            return np.ascontiguousarray(vectors)
        vectors = vectors[:, : self.dimension]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0), dtype=np.float32)

    # ------------------------------------------------------------ writes

    def _take_slots(self, n: int) -> np.ndarray:
        reuse = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = list(range(self._next_slot, self._next_slot + n - len(reuse)))
        self._next_slot += len(fresh)
        if self._next_slot > len(self._slots.alive):
            self._slots.grow(_grown(len(self._slots.alive), self._next_slot))
        self._store.reserve(self._next_slot)
        return np.array(reuse + fresh, dtype=np.int64)

    def _make_room(self, n: int) -> None:
        """Grow the vector store and the id map for n more posts beside the searches, before
        the write lock.

        Growing copies every row into a store twice the size: at 1M posts × 256 dims
        that took 3.5 s on the benchmark machine, and under the write lock every search
        would wait for it (after a restart, on the first new post, since a restored
        store is sized exactly). The id map's doubling is the same kind of copy (0.46 s
        at 6.4M posts). Here the copies run under a long read lock, so searches go on
        and only writers wait; the swap under the write lock is a pointer. If a write
        landed between the copy and the swap (another writer got in first), the copies
        are dropped and the write path grows under its lock as before.
        """
        if (self._next_slot + max(0, n - len(self._free)) <= self._store.capacity
                and not self._slot_of.needs_room(n)):
            return  # the common case, checked without locks: a stale answer only means the write path grows
        with self._grow_lock:
            with self._lock.read(long=True):
                store, ids, version = self._store, self._slot_of, self._version
                need = self._next_slot + max(0, n - len(self._free))
                started = time.perf_counter()
                bigger = store.grown(_grown(store.capacity, need)) if need > store.capacity else None
                copied = time.perf_counter()
                # n counts replaced posts too, so the map may grow a batch early: never late.
                wider = ids.grown(n) if ids.needs_room(n) else None
                widened = time.perf_counter()
                if bigger is None and wider is None:
                    return
            with self._lock.write():
                if self._store is not store or self._slot_of is not ids or self._version != version:
                    log.info("store_growth_dropped", reason="written meanwhile")
                    return
                if bigger is not None:
                    self._store = bigger
                if wider is not None:
                    self._slot_of = wider
            if bigger is not None:
                log.info("store_grown", rows=bigger.capacity, was=store.capacity, copy_s=round(copied - started, 3))
            if wider is not None:
                log.info("id_map_grown", buckets=wider.buckets, was=ids.buckets, posts=len(ids),
                         copy_s=round(widened - copied, 3))
            del store, ids  # searches still holding them finish with them; then their memory goes back
            release_free_memory()

    def _release(self, slots: np.ndarray) -> None:
        """Slots whose post was deleted, replaced or evicted. Under the write lock."""
        if not len(slots):
            return
        s = self._slots
        s.alive[slots] = False
        if self._ann is not None:
            covered = slots[s.in_ann[slots]]
            if self._ann.removable:
                self._ann.remove(covered)
                s.in_ann[covered] = False
            else:
                self.tombstones += len(covered)  # filtered out of every search until a rebuild
        if self._build is not None:
            return  # the build may hold them: freed (or tombstoned) when it swaps in
        self._free.extend(slots[~s.in_ann[slots]].tolist())

    def _pop_slots(self, post_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        return self._slot_of.pop_many(post_ids)

    def upsert(
        self,
        post_ids: Sequence[int],
        vectors: np.ndarray,
        created_at: Sequence[float],
        langs: Sequence[str],
        indexed_at: float,
        *,
        model_versions: Sequence[str],
    ) -> None:
        """Insert or replace. Within one call the last occurrence of an id wins.

        `model_versions`: per post, the model that embedded it (Lookup reports it).
        With retention, a post already older than the retention window replaces
        (removes) any earlier version and is not inserted.
        """
        vectors = self.prepare(vectors)
        if len(vectors) != len(post_ids):
            raise ValueError("post_ids and vectors differ in length")
        if isinstance(model_versions, str) or len(model_versions) != len(post_ids):
            raise ValueError("model_versions needs one model version per post")
        last: dict[int, int] = {}
        for row, pid in enumerate(post_ids):
            last[int(pid)] = row
        rows = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        ids = np.fromiter(last.keys(), dtype=np.int64, count=len(last))
        created = np.asarray(created_at, np.float64)[rows]
        if self.options.retention_s > 0:
            fresh = created >= indexed_at - self.options.retention_s
            expired = ids[~fresh]
            rows, ids, created = rows[fresh], ids[fresh], created[fresh]
        else:
            expired = ids[:0]
        build = None
        linking = None
        if len(ids):
            self._make_room(len(ids))
        with self._lock.write():
            models = [self._models.code(model_versions[r]) for r in rows]
            if None in models:  # a shard indexes one model; tens of thousands is a broken stream
                raise ValueError(f"more than {_Interned.LIMIT} model versions in one shard")
            self._release(self._pop_slots(np.concatenate([ids, expired])))
            self._version += 1
            if len(ids):
                slots = self._take_slots(len(ids))
                batch = vectors[rows]
                self._store.write(slots, batch)
                s = self._slots
                s.post_id[slots] = ids
                s.created_at[slots] = created
                s.indexed_after[slots] = indexed_at - created
                s.lang[slots] = [self._lang_code(langs[r]) for r in rows]
                s.model[slots] = models
                s.alive[slots] = True
                if self._ann is not None:
                    if self._build is None and len(slots) > _ANN_ADD_STEP and faiss_ann.adds_slowly(self._ann.index):
                        # Searchable at once (exactly, as buffered posts); linked into the graph
                        # below, a step at a time, so searches get in between the steps.
                        linking = (self._ann, slots)
                    else:
                        self._ann.add(batch, slots)
                        s.in_ann[slots] = True
                if self._build is not None:
                    with self._build.delta_lock:
                        self._build.delta.append(slots)
                self._slot_of.insert_many(ids, slots)
                self._maybe_encode()
            build = self._maybe_train()
        if linking is not None:
            self._link_in_steps(*linking)
        if build is not None:
            self._launch(build)

    def _link_in_steps(self, ann: Ann, slots: np.ndarray) -> None:
        """Add upserted slots to a graph index _ANN_ADD_STEP at a time, each step under the
        write lock, letting the searches that queued meanwhile in first.

        Until linked, a slot is alive and not in the index: searches find it exactly, as a
        buffered post. A step re-reads the slot's row and skips slots deleted, replaced or
        already linked since; if a build started or swapped the index, it covers them.
        """
        for start in range(0, len(slots), _ANN_ADD_STEP):
            step = slots[start : start + _ANN_ADD_STEP]
            with self._lock.write(after_waiting_readers=True):
                if self._ann is not ann or self._build is not None:
                    return
                s = self._slots
                step = step[s.alive[step] & ~s.in_ann[step]]
                if len(step):
                    ann.add(self._store.read(step), step)
                    s.in_ann[step] = True
                    self._version += 1

    def delete(self, post_ids: Iterable[int]) -> int:
        """Remove posts; unknown ids are ignored. Returns how many were removed."""
        with self._lock.write():
            slots = self._pop_slots(int(p) for p in post_ids)
            self._release(slots)
            self._version += 1
            return len(slots)

    def evict_older_than(self, cutoff: float) -> int:
        """Remove every post created before `cutoff` (Unix seconds). Returns how many."""
        with self._lock.read():  # the common case, nothing to evict, never blocks searches
            n = self._next_slot
            s = self._slots
            if not np.any(s.alive[:n] & (s.created_at[:n] < cutoff)):
                return 0
        with self._lock.write():
            n = self._next_slot
            s = self._slots
            slots = np.flatnonzero(s.alive[:n] & (s.created_at[:n] < cutoff))
            if not len(slots):
                return 0
            self._slot_of.pop_many(s.post_id[slots])
            self._release(slots)
            self._version += 1
            self.evicted += len(slots)
            return len(slots)

    def maintain(self, now: float | None = None) -> int:
        """The periodic sweep: evict posts past retention, start a rebuild when tombstones pile up.

        Returns how many posts were evicted.
        """
        now = time.time() if now is None else now
        evicted = self.evict_older_than(now - self.options.retention_s) if self.options.retention_s > 0 else 0
        if not self._build_due():
            return evicted
        with self._lock.write():
            build = self._maybe_rebuild() or self._maybe_train()
        if build is not None:
            self._launch(build)
        return evicted

    # ------------------------------------------------------------ background builds

    def _snapshot(self) -> np.ndarray:
        return np.flatnonzero(self._slots.alive[: self._next_slot])

    def _build_due(self) -> bool:
        """A cheap look, without the write lock, at whether a build may be due."""
        if self.exact_only or self._build is not None or self._failed:
            return False
        if self._ann is None:
            return self._template is None and len(self._slot_of) >= self._train_size
        return self.tombstones >= max(self.options.rebuild_fraction * self._ann.ntotal, 1)

    def _maybe_train(self) -> _Build | None:
        """Under the write lock: a training build once enough vectors have arrived."""
        if (
            self.exact_only
            or self._template is not None
            or self._build is not None
            or self._failed
            or len(self._slot_of) < self._train_size
        ):
            return None
        self._build = _Build(self._snapshot(), train=True, reason="train")
        return self._build

    def _maybe_rebuild(self) -> _Build | None:
        """Under the write lock: a rebuild once tombstones exceed rebuild_fraction of the index."""
        ann = self._ann
        if ann is None or self._build is not None or not self.tombstones or self._failed:
            return None
        if self.tombstones < self.options.rebuild_fraction * max(ann.ntotal, 1):
            return None
        self._build = _Build(self._snapshot(), train=False, reason="tombstones")
        return self._build

    def _launch(self, build: _Build) -> None:
        log.info("index_build_started", reason=build.reason, vectors=len(build.snapshot),
                 index_factory=self.index_factory)
        if self.options.background:
            threading.Thread(target=self._run_build, args=(build,), name="index-build", daemon=True).start()
        else:
            self._run_build(build)

    def _train(self, index, vectors: np.ndarray) -> None:
        """Train a fresh faiss index (a seam for tests)."""
        index.train(vectors)

    def _read_rows(self, slots: np.ndarray) -> np.ndarray:
        with self._lock.read():
            return self._store.read(slots)

    def _drain(self, build: _Build) -> np.ndarray:
        with build.delta_lock:
            parts, build.delta = build.delta, []
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _run_build(self, build: _Build) -> None:
        try:
            if build.train:
                index = faiss_ann.new_index(self.index_factory, self.dimension)
                self._train(index, self._read_rows(build.snapshot[: self._train_size]))
                template = index
            else:
                template = self._template
            ann = self._new_ann(template)
            in_new = np.zeros(len(self._slots.alive), bool)

            def add(slots: np.ndarray, rows: np.ndarray) -> None:
                nonlocal in_new
                ann.add(rows, slots)
                top = int(slots.max()) + 1 if len(slots) else 0
                if top > len(in_new):
                    in_new = np.concatenate([in_new, np.zeros(max(top, 2 * len(in_new)) - len(in_new), bool)])
                in_new[slots] = True

            for start in range(0, len(build.snapshot), _BUILD_CHUNK):
                chunk = build.snapshot[start : start + _BUILD_CHUNK]
                add(chunk, self._read_rows(chunk))
            while True:  # catch up with writes made meanwhile, outside the lock while there are many
                delta = self._drain(build)
                if len(delta) < _CATCH_UP_UNDER_LOCK:
                    break
                add(delta, self._read_rows(delta))
            with self._lock.write():
                delta = np.concatenate([delta, self._drain(build)])
                add(delta, self._store.read(delta))
                self._swap(build, ann, template, in_new)
            log.info("index_build_done", reason=build.reason, indexed=ann.ntotal,
                     seconds=round(time.monotonic() - build.started, 3), tombstones=self.tombstones)
        except Exception as exc:  # noqa: BLE001 - keep serving exactly from the store
            log.exception("index_build_failed", reason=build.reason, index_factory=self.index_factory)
            with self._lock.write():
                self._failed = f"{type(exc).__name__}: {exc}"
                self._build = None
                self._recompute_free()
        finally:
            build.done.set()

    def _swap(self, build: _Build, ann: Ann, template, in_new: np.ndarray) -> None:
        """Under the write lock: the new index replaces the old one."""
        s = self._slots
        cap = len(s.alive)
        if len(in_new) < cap:
            in_new = np.concatenate([in_new, np.zeros(cap - len(in_new), bool)])
        in_new = in_new[:cap]
        dead = np.flatnonzero(in_new & ~s.alive)  # deleted or replaced while it was building
        if ann.removable and len(dead):
            ann.remove(dead)
            in_new[dead] = False
        self._ann, self._template = ann, template
        s.in_ann[:] = in_new
        self.tombstones = int(np.count_nonzero(in_new & ~s.alive))
        self._build = None
        self.rebuilds += 1
        self._version += 1
        self._recompute_free()

    def _recompute_free(self) -> None:
        n = self._next_slot
        s = self._slots
        self._free = np.flatnonzero(~s.alive[:n] & ~s.in_ann[:n]).tolist()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait for a running build (tests, shutdown). True when none is left running."""
        deadline = time.monotonic() + timeout
        while True:
            build = self._build
            if build is None:
                return True
            if not build.done.wait(max(deadline - time.monotonic(), 0)):
                return False

    # ------------------------------------------------------------ reads

    def _excluded_slots(self, post_ids: Sequence[int]) -> np.ndarray:
        """Slots of the posts a filter excludes that this shard holds (a feed's "seen" list)."""
        if not len(post_ids):
            return np.empty(0, np.int64)
        slots = self._slot_of.get_many(np.asarray(post_ids, np.int64))
        return np.unique(slots[slots >= 0])

    def _allowed(self, filt: SearchFilter) -> np.ndarray:
        n = self._next_slot
        s = self._slots
        mask = s.alive[:n].copy()
        if filt.min_created_at is not None:
            mask &= s.created_at[:n] >= filt.min_created_at
        if filt.languages:
            codes = self._langs.known(filt.languages)
            mask &= np.isin(s.lang[:n], np.array(codes, dtype=np.int16))
        mask[self._excluded_slots(filt.exclude_post_ids)] = False
        return mask

    def _buffered(self) -> np.ndarray | None:
        """Live slots the approximate index does not hold yet (searched exactly); None if none."""
        version, mask = self._buffered_cache
        if version != self._version:
            n = self._next_slot
            mask = self._slots.alive[:n] & ~self._slots.in_ann[:n]
            mask = mask if mask.any() else None
            self._buffered_cache = (self._version, mask)
        return mask

    def search(
        self, query: np.ndarray, k: int, filt: SearchFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k post ids and inner-product scores, best first.

        When at least k posts pass the filter, k come back, whatever the index:
        an approximate search that falls short is retried wider, then exactly.
        """
        query = self.prepare(query)[0]
        faiss_ann.use_threads(self.options.search_threads)
        with self._lock.read():
            plan = self._plan(k, filt)
            return _EMPTY if plan is None else self._answer(query, plan)

    def _plan(self, k: int, filt: SearchFilter | None) -> _Plan | None:
        """Under the read lock: how to answer a top-k search under `filt`; None when nothing passes."""
        live = len(self._slot_of)
        if not live:
            return None
        filtered = filt is not None and not filt.is_empty
        mask = self._allowed(filt) if filtered else self._slots.alive[: self._next_slot]
        available = int(np.count_nonzero(mask)) if filtered else live
        if not available:
            return None
        k_eff = min(k, available)
        ann = self._ann
        if ann is None or available <= 4 * k_eff or available < self.options.exact_filter_fraction * live:
            return _Plan(k_eff, mask, filtered, exact=True)
        # Without a filter or tombstones every entry of the index is allowed: no selector needed.
        ann_mask = mask & self._slots.in_ann[: self._next_slot] if (filtered or self.tombstones) else None
        return _Plan(k_eff, mask, filtered, exact=False, ann_mask=ann_mask,
                     breadth=self.search_breadth(ann, k_eff, available / live))

    def _answer(
        self, query: np.ndarray, plan: _Plan, batched: tuple[np.ndarray, np.ndarray] | None = None, gpu: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Under the read lock: post ids and scores for one planned search (see `_ann_search`)."""
        if plan.exact:
            scores, slots = self._store.search(query, plan.k, plan.mask)
        else:
            scores, slots = self._ann_search(self._ann, query, plan, batched, gpu)
        return self._slots.post_id[slots].copy(), scores

    def _search_batch_cpu(
        self, queries: np.ndarray, ks: Sequence[int], filts: Sequence[SearchFilter | None]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """A CPU faiss index's batch (Flat, IVF, HNSW): the queries whose filter only excludes
        posts (a feed's "seen" list) share one search of the live posts (`_top_live`), deep
        enough to drop their exclusions after; age and language filters, which can rule out
        most posts, and a row the shared search left short are searched as `search` does."""
        queries = self.prepare(queries)
        faiss_ann.use_threads(self.options.search_threads)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
        with self._lock.read():
            live = len(self._slot_of)
            if not live:
                return [_EMPTY] * len(queries)
            shared = [i for i, f in enumerate(filts) if f is None or (f.min_created_at is None and not f.languages)]
            if len(shared) > 1:
                excluded = [self._excluded_slots(filts[i].exclude_post_ids if filts[i] else ()) for i in shared]
                depth = min(max(int(ks[i]) + len(x) for i, x in zip(shared, excluded)), live)
                scores, slots = self._top_live(queries[shared], depth)
                for row, (i, x) in enumerate(zip(shared, excluded)):
                    keep = slots[row] >= 0
                    if len(x):
                        keep &= ~np.isin(slots[row], x)
                    want = min(int(ks[i]), live - len(x))
                    top = slots[row][keep][:want]
                    if len(top) == want:  # else: searched alone, which widens until k are found
                        out[i] = (self._slots.post_id[top].copy(), scores[row][keep][:want].astype(np.float32))
            for i, (q, k, f) in enumerate(zip(queries, ks, filts)):
                if out[i] is None:
                    plan = self._plan(k, f)
                    out[i] = _EMPTY if plan is None else self._answer(q, plan)
        return out

    def _top_live(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Under the read lock: each query's top `depth` live posts, (B, depth) scores and
        slots (-1 past the last found), in one search: exact over the store where `_plan`
        would search exactly, else the approximate index merged with the posts it does not
        hold yet (searched exactly, as `_ann_search` does for one query)."""
        alive = self._slots.alive[: self._next_slot]
        ann = self._ann
        live = len(self._slot_of)
        if ann is None or live <= 4 * depth:
            return self._store.search_batch(queries, depth, alive)
        ann_mask = alive & self._slots.in_ann[: self._next_slot] if self.tombstones else None
        nprobe, ef = self.search_breadth(ann, depth, 1.0)
        scores, slots = ann.search_batch(queries, depth, ann_mask, nprobe, ef)
        scores = np.where(slots >= 0, scores, -np.inf).astype(np.float32)
        buffered = self._buffered()
        if buffered is not None:
            extra_scores, extra_slots = self._store.search_batch(queries, depth, buffered)
            scores = np.concatenate([scores, extra_scores], axis=1)
            slots = np.concatenate([slots, extra_slots], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
            scores, slots = np.take_along_axis(scores, order, axis=1), np.take_along_axis(slots, order, axis=1)
        return scores, slots

    @property
    def batches_searches(self) -> bool:
        """True when search_batch answers a batch in one pass: over the torch store's rows,
        or through a GPU copy of the approximate index (one GPU search for the batch)."""
        if isinstance(self._store, TorchStore):
            return True
        ann = self._ann
        return ann is not None and ann.mirror is not None and not ann.mirror.failed

    def search_batch(
        self, queries: np.ndarray, ks: Sequence[int], filts: Sequence[SearchFilter | None]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for several queries at once, each with its own k and filter; results in order.

        With the torch store, one pass over the rows answers them all (each query
        masked by its own filter); through a GPU copy, one GPU search; on a CPU faiss
        index, one search for the queries without age or language filters.
        """
        if not (len(queries) == len(ks) == len(filts)):
            raise ValueError(f"{len(queries)} queries, {len(ks)} ks and {len(filts)} filters")
        if len(queries) == 1:
            # A batch of one (a lone query through the shard's batcher): the single-query path,
            # without the batch's masks and padding (0.6-0.8 ms of a 3 ms torch search here).
            return [self.search(queries[0], ks[0], filts[0])]
        if not isinstance(self._store, TorchStore):
            if self.batches_searches:
                return self._search_batch_on_gpu(queries, ks, filts)
            return self._search_batch_cpu(queries, ks, filts)
        queries = self.prepare(queries)
        with self._lock.read():
            live = len(self._slot_of)
            if not live:
                return [_EMPTY] * len(queries)
            alive = self._slots.alive[: self._next_slot]
            # A feed's "seen" list excludes a few hundred posts: rather than one mask per query,
            # search k + that many over the shared mask and drop them after. Only age and
            # language filters, which can exclude most posts, get a mask row of their own.
            excluded = [
                self._excluded_slots(f.exclude_post_ids) if f is not None else np.empty(0, np.int64)
                for f in filts
            ]
            masked = [f is not None and (f.min_created_at is not None or bool(f.languages)) for f in filts]
            if any(masked):
                rows = [self._allowed(replace(f, exclude_post_ids=())) if m else alive for f, m in zip(filts, masked)]
                mask = np.stack(rows)
                available = [int(np.count_nonzero(r)) for r in rows]
                excluded = [x[r[x]] for x, r in zip(excluded, rows)]  # only those the mask lets through count
            else:
                mask = alive
                available = [live] * len(queries)
            wanted = [min(int(k), a - len(x)) for k, a, x in zip(ks, available, excluded)]
            depth = max(w + len(x) for w, x in zip(wanted, excluded))
            if max(wanted) < 1:
                return [_EMPTY] * len(queries)
            scores, slots = self._store.search_batch(queries, depth, mask)
            out = []
            for row, (want, x) in enumerate(zip(wanted, excluded)):
                keep = slots[row] >= 0
                if len(x):
                    keep &= ~np.isin(slots[row], x)
                s, sl = scores[row][keep][:want], slots[row][keep][:want]
                out.append((self._slots.post_id[sl].copy(), s))
            return out

    def _search_batch_on_gpu(
        self, queries: np.ndarray, ks: Sequence[int], filts: Sequence[SearchFilter | None]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """search_batch through the GPU copy: the queries the approximate index answers go to
        the GPU in one search (the GPU costs about the same for one query as for a batch, and
        its searches are serialised); each is then finished as `search` finishes it, and what
        the copy declines is searched on the CPU index as alone."""
        queries = self.prepare(queries)
        faiss_ann.use_threads(self.options.search_threads)
        with self._lock.read():
            plans = [self._plan(int(k), f) for k, f in zip(ks, filts)]
            ann = self._ann
            todo = [i for i, p in enumerate(plans) if p is not None and not p.exact]
            answers: dict[int, tuple | None] = {}
            if todo and ann is not None and ann.mirror is not None:
                found = ann.mirror.search_batch(queries[todo], [plans[i].k for i in todo],
                                                [plans[i].ann_mask for i in todo], [plans[i].breadth[0] for i in todo])
                answers = dict(zip(todo, found))
            return [
                _EMPTY if p is None else self._answer(q, p, answers.get(i), gpu=i not in answers)
                for i, (q, p) in enumerate(zip(queries, plans))
            ]

    def search_breadth(self, ann: Ann, k: int, passing: float) -> tuple[int, int]:
        """(nprobe, efSearch) for a top-k search where a fraction `passing` of posts pass the
        filter: the configured values as floors, widened as `faiss_ann.search_breadth` says."""
        return faiss_ann.search_breadth(ann.nlist, ann.ntotal, k, passing, self.options.nprobe, self.options.ef_search)

    def _ann_search(
        self, ann: Ann, query: np.ndarray, plan: _Plan,
        batched: tuple[np.ndarray, np.ndarray] | None = None, gpu: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The approximate index's top k of the plan's mask, with posts it does not hold yet searched exactly.

        `batched`: the GPU copy's answer from a batched search, used for the first attempt;
        `gpu`: whether this search may ask the GPU copy (a batch already did).
        """
        k, mask = plan.k, plan.mask
        buffered = (mask & ~self._slots.in_ann[: self._next_slot]) if plan.filtered else self._buffered()
        extra = self._store.search(query, k, buffered) if buffered is not None and buffered.any() else None
        nprobe, ef = plan.breadth
        for widen in (1, 8):
            if widen == 1 and batched is not None:
                scores, slots = batched
            else:
                scores, slots = ann.search(query, k, plan.ann_mask, nprobe * widen, ef * widen, gpu=gpu)
            if extra is not None:
                scores = np.concatenate([scores, extra[0]])
                slots = np.concatenate([slots, extra[1]])
                order = np.argsort(-scores, kind="stable")[:k]
                scores, slots = scores[order], slots[order]
            if len(slots) >= k:
                return scores, slots
        return self._store.search(query, k, mask)  # the approximate index could not fill k: exact

    def _lang_code(self, lang: str) -> int:
        code = self._langs.code(lang)
        if code is None:  # past the table's size a post is kept without a language
            if not self._langs_full_logged:
                log.warning("languages_table_full", limit=_Interned.LIMIT, lang=lang[:40])
                self._langs_full_logged = True
            return 0
        return code

    def lookup(self, post_id: int, include_vector: bool = False) -> PostRecord | None:
        with self._lock.read():
            slot = self._slot_of.get(int(post_id))
            if slot is None:
                return None
            s = self._slots
            vector = self._store.read(np.array([slot]))[0] if include_vector else None
            return PostRecord(
                post_id=int(post_id),
                created_at=float(s.created_at[slot]),
                lang=self._langs.names[int(s.lang[slot])],
                indexed_at=float(s.created_at[slot]) + float(s.indexed_after[slot]),
                model_version=self._models.names[int(s.model[slot])],
                vector=vector,
            )

    # ------------------------------------------------------------ snapshots

    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """A consistent copy of everything needed to restore this index: (meta, arrays).

        Taken under the read lock, so searches go on; writes wait for the copy.
        A build in progress is not captured (it restarts after a restore if still due).
        """
        import faiss

        with self._lock.read(long=True):
            n = self._next_slot
            s = self._slots
            sections = {name: getattr(s, name)[:n].copy() for name in _Slots.NAMES}
            sections.update(codecs.export(self._store, n))
            if self._ann is not None:
                sections["ann"] = faiss.serialize_index(self._ann.index)
            if self._template is not None:
                sections["template"] = faiss.serialize_index(self._template)
            meta = {
                "input_dimension": self.input_dimension,
                "dimension": self.dimension,
                "index_factory": self.index_factory,
                "backend": self.options.backend,
                "codec": self.vector_codec,
                "langs": list(self._langs.names),
                "model_versions": list(self._models.names),
                "ann_removable": self._ann.removable if self._ann is not None else False,
                "ann_hashtable": self._ann.hashtable if self._ann is not None else False,
                "indexed": len(self._slot_of),
                "evicted": self.evicted,
                "rebuilds": self.rebuilds,
            }
        return meta, sections

    @classmethod
    def from_state(
        cls, meta: dict, sections: dict[str, np.ndarray], options: IndexOptions, model_version: str = ""
    ) -> "ShardIndex":
        """Rebuild an index from `export_state`; IndexConfigError when it was made under another configuration.

        `model_version`: what a snapshot from before model versions were kept per post
        (no `model` section) holds every post as: the shard's model version it recorded.
        """
        import faiss

        ix = cls(int(meta["input_dimension"]), options=options)
        made = (meta["dimension"], meta["index_factory"], meta["backend"])
        now = (ix.dimension, ix.index_factory, options.backend)
        if made != now:
            raise IndexConfigError(f"snapshot made for (dimension, factory, backend) {made}, configured {now}")
        n = len(sections["post_id"])
        with ix._lock.write():
            s = ix._slots
            s.grow(_grown(n, n))  # a quarter's room past 1M posts, as the store grows
            if "model" not in sections:  # written before model versions were kept per post
                models = _Interned()
                sections = {**sections, "model": np.full(n, models.code(model_version), np.int16)}
                meta = {**meta, "model_versions": models.names}
            if "indexed_after" not in sections:  # written when the time itself was kept (float64)
                sections = {**sections, "indexed_after": sections["indexed_at"] - sections["created_at"]}
            for name in ("lang", "model"):  # int32 codes before they were int16
                if n and int(sections[name].max()) >= _Interned.LIMIT:
                    raise IndexConfigError(f"snapshot has more than {_Interned.LIMIT} distinct {name} values")
            for name in _Slots.NAMES:
                getattr(s, name)[:n] = sections[name]
            ix._next_slot = n
            try:
                if isinstance(ix._store, TorchStore):
                    ix._store = codecs.restore_torch(ix.dimension, options.vector_codec, meta.get("codec", "float32"),
                                                     sections, ix._store.device, options.torch_chunk_rows,
                                                     **ix._codec_options())
                else:
                    ix._store = codecs.restore(ix.dimension, options.vector_codec, meta.get("codec", "float32"),
                                               sections, **ix._codec_options())
            except ValueError as exc:
                raise IndexConfigError(str(exc)) from None
            ix._langs = _Interned(meta["langs"])
            ix._models = _Interned(meta["model_versions"])
            live = np.flatnonzero(s.alive[:n])
            ix._slot_of = IdMap.from_arrays(s.post_id[live], live)
            if "template" in sections:
                ix._template = faiss.deserialize_index(sections["template"])
            if "ann" in sections:
                ix._ann = Ann(faiss.deserialize_index(sections["ann"]), bool(meta["ann_removable"]),
                              bool(meta["ann_hashtable"]))
                faiss_ann.reserve_headroom(ix._ann.index)  # or the first new post stalls searches
                ix._ann = ix._mirrored(ix._ann)
            elif ix._ann is None:
                s.in_ann[:] = False
            if "rows" in sections and "codes" not in sections:  # codes were checked before they were encoded
                ix._drop_unsound(sections["rows"], live)
            ix._maybe_encode()
            ix.tombstones = int(np.count_nonzero(s.in_ann[:n] & ~s.alive[:n]))
            ix.evicted = int(meta.get("evicted", 0))
            ix.rebuilds = int(meta.get("rebuilds", 0))
            ix._recompute_free()
            ix._version += 1
        return ix

    def _drop_unsound(self, rows: np.ndarray, live: np.ndarray, chunk: int = 65536) -> int:
        """Forget live posts whose stored vector is not sound (under the write lock, at restore).

        A snapshot written before shards checked their vectors may hold a NaN, infinite
        or zero one, which would top or poison result lists until the post changes.
        """
        from feedret.indexer.vectors import check_vectors

        bad = [slot for start in range(0, len(live), chunk)
               for slot, problem in zip(live[start:start + chunk], check_vectors(rows[live[start:start + chunk]]))
               if problem is not None]
        if bad:
            slots = np.asarray(bad, dtype=np.int64)
            self._slot_of.pop_many(self._slots.post_id[slots])
            self._release(slots)
            log.warning("snapshot_unsound_vectors_dropped", posts=len(bad),
                        post_ids=self._slots.post_id[slots][:10].tolist())
        return len(bad)

    # ------------------------------------------------------------ introspection

    @property
    def state(self) -> str:
        """exact | buffering | training | ready | rebuilding | failed."""
        if self.exact_only:
            return "exact"
        if self._failed and self._ann is None:
            return "failed"
        if self._ann is None:
            return "training" if self._build is not None else "buffering"
        return "rebuilding" if self._build is not None else "ready"

    def info(self) -> IndexInfo:
        with self._lock.read():
            n = self._next_slot
            s = self._slots
            buffered = 0 if self.exact_only else int(np.count_nonzero(s.alive[:n] & ~s.in_ann[:n]))
            return IndexInfo(
                index_type=self.index_type,
                index_device=self.device,
                gpu_searches=self.gpu_searches.answered,
                gpu_declined=self.gpu_searches.declined,
                state=self.state,
                error=self._failed,
                indexed=len(self._slot_of),
                dimension=self.dimension,
                input_dimension=self.input_dimension,
                buffered=buffered,
                train_size=self._train_size,
                tombstones=self.tombstones,
                ann_entries=self._ann.ntotal if self._ann is not None else 0,
                slots=n,
                store_rows=self._store.capacity,
                vector_codec=self.vector_codec,
                store_bytes=self._store.nbytes,
                evicted=self.evicted,
                rebuilds=self.rebuilds,
            )
