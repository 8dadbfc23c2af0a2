"""Snapshots: an index restored from disk answers as the original did; torn or corrupt files are skipped."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from feedret.config import ShardConfig
from feedret.indexer import snapshot as snapshots
from feedret.indexer.replica import ShardState
from feedret.indexer.rwlock import RWLock
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, SearchFilter, ShardIndex
from feedret.indexer.upkeep import Snapshotter
from feedret.v1 import feedret_pb2 as pb

from test_index_types import D, KINDS, Reference, check, unit


def round_trip(ix: ShardIndex, tmp_path, options=None) -> ShardIndex:
    meta, sections = ix.export_state()
    path = snapshots.write_snapshot(tmp_path, 0, 123, {"index": meta}, sections)
    header, read = snapshots.read_snapshot(path)
    assert header["applied_offset"] == 123 and header["shard_id"] == 0
    return ShardIndex.from_state(header["index"], read, options or ix.options)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-buffering", "hnsw", "torch",
                                  "fp16", "int8", "binary", "binary-disk", "binary-rabitq", "ivf-int8", "torch-int8",
                                  "torch-binary"])
def test_a_restored_index_answers_like_the_original_and_keeps_working(kind, tmp_path):
    rng = np.random.default_rng(4)
    opts = replace(KINDS["ivf-flat" if kind == "ivf-buffering" else kind], background=False)
    if kind == "ivf-buffering":
        opts = replace(opts, train_size=5000)
    ix = ShardIndex(D, options=opts)
    ref = Reference()
    vecs = unit(rng, 2000)
    ids = np.arange(2000, dtype=np.int64) * 11
    langs = ["de" if i % 4 == 0 else "en" for i in range(2000)]
    ref.upsert(ix, ids, vecs, np.arange(2000.0), langs)
    ref.delete(ix, ids[::5])
    ref.upsert(ix, ids[1:200:5], unit(rng, 40), [7.0] * 40, ["fr"] * 40)

    restored = round_trip(ix, tmp_path)
    for key in ("index_type", "state", "indexed", "dimension", "buffered", "tombstones", "ann_entries", "slots",
                "vector_codec"):
        assert getattr(restored.info(), key) == getattr(ix.info(), key), key
    per_post = [i.store_bytes / i.store_rows for i in (ix.info(), restored.info())]  # a restore sizes exactly
    assert per_post[0] == per_post[1], per_post
    filt = SearchFilter(languages=["de", "fr"], exclude_post_ids=ids[1:50].tolist())
    for q in unit(rng, 4):
        for f in (None, filt):
            a, sa = ix.search(q, 30, f)
            b, sb = restored.search(q, 30, f)
            assert a.tolist() == b.tolist()
            np.testing.assert_allclose(sa, sb, atol=1e-6)
    rec = restored.lookup(int(ids[6]), include_vector=True)
    assert rec.lang == "fr" and rec.created_at == 7.0
    np.testing.assert_allclose(rec.vector, ix.lookup(int(ids[6]), include_vector=True).vector)

    # It goes on taking writes: deletes stay deleted, freed slots are reused, builds still run.
    slots = restored.info().slots
    ref.upsert(restored, ids[::5][:100], unit(rng, 100), [8.0] * 100, ["en"] * 100)
    ref.delete(restored, ids[2:400:5])
    restored.maintain()
    assert restored.wait_idle(60)
    for q in unit(rng, 4):
        check(restored, ref, q, 40, min_recall=0.5)
    if kind not in ("hnsw",):
        assert restored.info().slots == slots


def test_a_snapshot_of_another_configuration_is_refused(tmp_path):
    ix = ShardIndex(D, options=IndexOptions(serve_dimension=16))
    ix.upsert([1], unit(np.random.default_rng(0), 1), [0.0], ["en"], 0, model_versions=["m1"])
    for other in (IndexOptions(), IndexOptions(serve_dimension=16, index_factory="HNSW8"),
                  IndexOptions(serve_dimension=16, backend="torch", device="cpu")):
        with pytest.raises(IndexConfigError, match="snapshot made for"):
            round_trip(ix, tmp_path, other)


def test_torn_truncated_and_foreign_files_are_refused(tmp_path):
    path = snapshots.write_snapshot(tmp_path, 0, 5, {"x": 1}, {"a": np.arange(1000)})
    data = bytearray(path.read_bytes())
    for name, broken in [
        ("flipped", data[:500] + bytes([data[500] ^ 0x01]) + data[501:]),
        ("truncated", data[:-100]),
        ("empty", b""),
        ("foreign", b"PK\x03\x04" + data[4:]),
    ]:
        bad = tmp_path / f"{name}.snap"
        bad.write_bytes(bytes(broken))
        with pytest.raises(snapshots.CorruptSnapshot):
            snapshots.read_snapshot(bad)
    header, sections = snapshots.read_snapshot(path)
    assert header["x"] == 1 and sections["a"].tolist() == list(range(1000))


def shard_state(tmp_path, n=300, **config) -> ShardState:
    state = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path), **config), topic="post-vectors")
    vecs = unit(np.random.default_rng(9), n)
    state.apply([(i, pb.PostVectorEvent(post_id=10 + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                        created_at=1.0, lang="en", model_version="m7"))
                 for i, v in enumerate(vecs)], now=0.0)
    return state


def test_the_newest_intact_snapshot_is_loaded_and_older_ones_are_pruned(tmp_path):
    state = shard_state(tmp_path, snapshot_keep=2)
    taker = Snapshotter(state)
    first = Path(taker.take("test"))
    assert taker.take("test") is None  # nothing applied since
    state.apply([(300, pb.PostVectorEvent(post_id=10, op=pb.PostVectorEvent.DELETE))], now=0.0)
    second = Path(taker.take("test"))
    state.apply([(301, pb.PostVectorEvent(post_id=11, op=pb.PostVectorEvent.DELETE))], now=0.0)
    third = Path(taker.take("test"))
    assert snapshots.list_snapshots(tmp_path, 0) == [third, second]  # the first was pruned
    assert not first.exists()

    # A crash mid-write leaves a temporary file; a disk fault corrupts the newest snapshot.
    (tmp_path / f".{third.name}.tmp999").write_bytes(b"half a snapshot")
    data = bytearray(third.read_bytes())
    data[len(data) // 2] ^= 0xFF
    third.write_bytes(bytes(data))

    fresh = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path)), topic="post-vectors")
    loader = Snapshotter(fresh)
    assert loader.load_newest()
    assert fresh.applied_offset == 301 and len(fresh.index) == 299  # the second: post 10 deleted, 11 not yet
    assert 10 not in fresh.index and 11 in fresh.index
    assert (fresh.upserts, fresh.deletes, fresh.model_version) == (300, 1, "m7")
    assert not list(tmp_path.glob(".*.tmp*"))
    assert loader.last_offset == 301


def test_a_snapshot_older_than_the_tombstones_are_kept_is_not_restored(tmp_path):
    # Compaction may since have dropped a delete's tombstone, so restoring it and replaying
    # the rest could bring a deleted post back: the replica replays its partition whole.
    Snapshotter(shard_state(tmp_path)).take("test")
    within = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path)), topic="post-vectors")
    assert Snapshotter(within).load_newest() and within.applied_offset == 300
    too_old = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path), snapshot_max_age_s=1e-6), topic="post-vectors")
    assert not Snapshotter(too_old).load_newest()
    assert too_old.index is None and too_old.applied_offset == 0
    assert snapshots.list_snapshots(tmp_path, 0), "kept on disk: a later config may accept it"


def test_a_quiet_shard_writes_its_snapshot_again_before_it_ages_out_of_use(tmp_path):
    state = shard_state(tmp_path, snapshot_max_age_s=0.2)
    taker = Snapshotter(state)
    first = taker.take("test")
    assert taker.take("test") is None  # nothing applied, and still young
    time.sleep(0.15)  # past half of snapshot_max_age_s
    again = taker.take("test")
    assert again == first  # the same offset, written again: a restart can still restore it
    assert Snapshotter(ShardState(config=ShardConfig(snapshot_dir=str(tmp_path), snapshot_max_age_s=0.2),
                                  topic="post-vectors")).load_newest()


def test_snapshots_of_another_shard_or_width_are_skipped(tmp_path):
    Snapshotter(shard_state(tmp_path)).take("test")
    for config in ({"shard_id": 1}, {"num_shards": 3}, {"serve_dimension": 8}, {"dimension": 64}):
        fresh = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path), **config), topic="post-vectors")
        assert not Snapshotter(fresh).load_newest(), config
        assert fresh.index is None and fresh.applied_offset == 0


def _rwlock_race(long: bool) -> list[str]:
    """A reader holds the lock, a writer queues, then another reader arrives: who gets in first?"""
    lock = RWLock()
    events: list[str] = []
    held, release = threading.Event(), threading.Event()

    def first_reader():
        with lock.read(long=long):
            held.set()
            release.wait(5)

    def writer():
        with lock.write():
            events.append("write")

    def reader():
        with lock.read():
            events.append("read")

    threads = [threading.Thread(target=first_reader)]
    threads[0].start()
    held.wait(5)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    time.sleep(0.05)  # the writer now waits
    threads.append(threading.Thread(target=reader))
    threads[2].start()
    time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(5)
    return events


def test_a_snapshot_copy_does_not_make_searches_queue_behind_a_waiting_writer():
    assert _rwlock_race(long=True) == ["read", "write"]  # a search gets in while the copy runs
    assert _rwlock_race(long=False) == ["write", "read"]  # otherwise the writer goes first


class FakeConsumer:
    """Serves a partition (a list of post ids, one record each) to PartitionApplier's position check."""

    def __init__(self, post_ids, dropped=()):
        from types import SimpleNamespace

        # `dropped`: offsets compaction removed (their posts were written again later).
        self.records = [SimpleNamespace(offset=i, key=str(p).encode(), value=pb.PostVectorEvent(post_id=p).SerializeToString())
                        for i, p in enumerate(post_ids) if i not in dropped]
        self.at = 0

    def seek(self, tp, offset):
        after = [i for i, r in enumerate(self.records) if r.offset >= offset]
        self.at = after[0] if after else 0  # out of range: auto_offset_reset earliest

    def poll(self, timeout_ms):
        batch = self.records[self.at : self.at + 5]
        self.at += len(batch)
        return {"tp": batch} if batch else {}


@pytest.mark.parametrize(
    "partition, kept",
    [
        (list(range(10, 310)) + [5, 6], True),  # the same partition, grown since
        (list(range(10, 310)), True),  # exactly where the snapshot ended
        ([99] * 400, False),  # recreated and refilled past the snapshot's offset
        ([99] * 20, False),  # recreated, shorter than the snapshot's offset
        ([], False),  # recreated, empty
        ((list(range(10, 310)) + [309, 400], (299,)), True),  # compacted: post 309 written again at 300
    ],
    ids=["grown", "same", "recreated-longer", "recreated-shorter", "recreated-empty", "compacted"],
)
def test_a_snapshot_whose_last_record_is_not_on_the_partition_is_dropped(tmp_path, partition, kept):
    from feedret.config import KafkaConfig
    from feedret.indexer.applier import PartitionApplier

    Snapshotter(shard_state(tmp_path)).take("test")  # ends on offset 299, post 309
    fresh = ShardState(config=ShardConfig(snapshot_dir=str(tmp_path)), topic="post-vectors")
    assert Snapshotter(fresh).load_newest() and fresh.position == (300, 309) and fresh.verify_position
    applier = PartitionApplier(KafkaConfig(), fresh, on_caught_up=lambda: None)
    consumer = FakeConsumer(*partition) if isinstance(partition, tuple) else FakeConsumer(partition)
    assert applier.verify_snapshot_position(consumer, "tp", timeout_s=0.5) is kept
    assert not fresh.verify_position
    if kept:
        assert fresh.applied_offset == 300 and len(fresh.index) == 300
    else:
        assert fresh.index is None and fresh.applied_offset == 0 and fresh.upserts == 0


# ---------------------------------------------------------------- object storage


def _bucket(name: str) -> str:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}/feedret/snapshots"


def test_snapshots_in_an_s3_bucket_restore_a_replica_that_has_no_disk_of_its_own(s3, tmp_path):
    url = _bucket("restore")
    state = shard_state(tmp_path / "writer", snapshot_keep=2)
    state.config = ShardConfig(snapshot_dir=url, snapshot_keep=2, snapshot_staging_dir=str(tmp_path / "stage-a"))
    taker = Snapshotter(state)
    first = taker.take("test")
    state.apply([(300, pb.PostVectorEvent(post_id=10, op=pb.PostVectorEvent.DELETE))], now=0.0)
    taker.take("test")
    state.apply([(301, pb.PostVectorEvent(post_id=11, op=pb.PostVectorEvent.DELETE))], now=0.0)
    third = taker.take("test")
    store = snapshots.SnapshotStore(url)
    assert [e.offset for e in store.entries(0)] == [302, 301]  # the first was pruned from the bucket
    assert first.startswith("restore/feedret/snapshots/") and third.endswith("shard-0-00000000000000000302.snap")
    assert not [p for p in (tmp_path / "stage-a").rglob("*") if p.is_file()], "staging is emptied after upload"

    # A replica elsewhere: its own (empty) staging, the shared bucket.
    fresh = ShardState(config=ShardConfig(snapshot_dir=url, snapshot_staging_dir=str(tmp_path / "stage-b")),
                       topic="post-vectors")
    assert Snapshotter(fresh).load_newest()
    assert fresh.applied_offset == 302 and len(fresh.index) == 298
    assert 10 not in fresh.index and 11 not in fresh.index and 12 in fresh.index
    assert not [p for p in (tmp_path / "stage-b").rglob("*") if p.is_file()]


def test_a_corrupt_object_is_skipped_for_the_next_newest_and_old_ones_are_pruned_by_age(s3, tmp_path):
    import fsspec

    url = _bucket("corrupt")
    state = shard_state(tmp_path, snapshot_keep=5)
    state.config = ShardConfig(snapshot_dir=url, snapshot_keep=5)
    taker = Snapshotter(state)
    good = taker.take("test")
    state.apply([(300, pb.PostVectorEvent(post_id=10, op=pb.PostVectorEvent.DELETE))], now=0.0)
    newest = taker.take("test")
    fs, _ = fsspec.core.url_to_fs(url)
    data = bytearray(fs.cat_file(newest))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(newest, bytes(data))

    fresh = ShardState(config=ShardConfig(snapshot_dir=url), topic="post-vectors")
    assert Snapshotter(fresh).load_newest() and fresh.applied_offset == 300 and 10 in fresh.index

    # Past snapshot_max_age_s none would be restored: pruning keeps only the newest.
    store = snapshots.SnapshotStore(url)
    assert store.prune(0, keep=5, max_age_s=1e-6) == [good]
    assert [e.location for e in store.entries(0)] == [newest]


def test_an_unreachable_bucket_means_a_full_replay_not_a_shard_that_will_not_start(s3, tmp_path, monkeypatch):
    fresh = ShardState(config=ShardConfig(snapshot_dir="s3://no-such-bucket/x"), topic="post-vectors")
    assert not Snapshotter(fresh).load_newest()
    assert fresh.index is None and fresh.applied_offset == 0
    # Nothing listening at the endpoint: botocore's own error, not an OSError.
    import s3fs

    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        nowhere = ShardState(config=ShardConfig(snapshot_dir="s3://restore/feedret/snapshots"), topic="post-vectors")
        assert not Snapshotter(nowhere).load_newest()
        assert nowhere.index is None
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # the other tests' filesystems point at the server again


def test_a_codec_snapshot_restores_its_codes_and_a_float32_one_converts(tmp_path):
    """Changing a shard's codec from float32 needs no replay: its float32 snapshot is encoded at
    restore. Codes of one codec are not turned into another's: refused, so the shard replays."""
    rng = np.random.default_rng(5)
    vecs = unit(rng, 1200)
    ids = np.arange(1200, dtype=np.int64)
    f32 = ShardIndex(D, options=IndexOptions())
    f32.upsert(ids, vecs, [0.0] * 1200, ["en"] * 1200, 0, model_versions=["m1"] * 1200)
    as_int8 = round_trip(f32, tmp_path / "a", IndexOptions(vector_codec="int8", codec_train_size=1000))
    info = as_int8.info()
    assert info.vector_codec == "int8" and info.store_bytes == info.store_rows * D
    assert as_int8.search(vecs[3], 1)[0].tolist() == [3]
    with pytest.raises(IndexConfigError, match="int8 codes"):
        round_trip(as_int8, tmp_path / "b", IndexOptions(vector_codec="binary"))
    # Sign bits and RaBitQ codes are both "binary", of different widths: refused either way.
    as_bits = round_trip(f32, tmp_path / "d", IndexOptions(vector_codec="binary", codec_train_size=1000))
    with pytest.raises(IndexConfigError, match="bytes a post"):
        round_trip(as_bits, tmp_path / "e", IndexOptions(vector_codec="binary", binary_search="rabitq"))
    # Fewer vectors than the codec trains on: the snapshot holds float32 rows, restored staged,
    # and the store is encoded once enough have arrived.
    staged = ShardIndex(D, options=IndexOptions(vector_codec="int8", codec_train_size=1000))
    staged.upsert(ids[:600], vecs[:600], [0.0] * 600, ["en"] * 600, 0, model_versions=["m1"] * 600)
    assert staged.info().vector_codec == "float32"
    restored = round_trip(staged, tmp_path / "c")
    assert restored.info().vector_codec == "float32" and len(restored) == 600
    restored.upsert(ids[600:], vecs[600:], [0.0] * 600, ["en"] * 600, 0, model_versions=["m1"] * 600)
    assert restored.info().vector_codec == "int8"
    assert [restored.search(vecs[i], 1)[0][0] for i in (5, 700)] == [5, 700]
