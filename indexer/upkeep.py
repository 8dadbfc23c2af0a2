"""A replica's two background chores, each a daemon thread beside the applier.

`Sweeper`: every sweep_interval_s, evicts posts past retention and starts the
index rebuilds that are due (ShardIndex.maintain). `Snapshotter`: every
snapshot_interval_s, writes the replica's index and position to snapshot_dir
(a directory or an object store URL) when anything was applied since the last
(feedret.indexer.snapshot holds the format and the store), and at start restores the newest one that fits, so a restarted replica
replays only the partition's tail. A failed round is logged and the next one
tries again; the replica keeps serving either way. Both stop when their
`stop_event` is set.
"""

from __future__ import annotations

import threading
import time

import structlog

from feedret.indexer import metrics
from feedret.indexer import snapshot as snapshots
from feedret.indexer.replica import ShardState
from feedret.indexer.shard_index import IndexConfigError
from feedret.indexer.stores import release_free_memory

log = structlog.get_logger(__name__)


class Sweeper(threading.Thread):
    """Every sweep_interval_s: evict posts past retention, start index rebuilds that are due."""

    def __init__(self, state: ShardState) -> None:
        super().__init__(name=f"sweeper-{state.config.shard_id}", daemon=True)
        self.state = state
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.state.config.sweep_interval_s):
            index = self.state.index
            if index is None:
                continue
            try:
                evicted = index.maintain(time.time())
            except Exception:  # noqa: BLE001 - the next sweep tries again
                log.exception("sweep_failed")
                continue
            if evicted:
                log.info("retention_evicted", evicted=evicted, indexed=len(index))


class Snapshotter(threading.Thread):
    """Writes a snapshot every snapshot_interval_s when the shard applied anything since the last."""

    def __init__(self, state: ShardState) -> None:
        super().__init__(name=f"snapshotter-{state.config.shard_id}", daemon=True)
        self.state = state
        self.store = snapshots.SnapshotStore(state.config.snapshot_dir, state.config.snapshot_staging_dir)
        self.stop_event = threading.Event()
        self.last_offset = -1
        self.last_written_at = 0.0  # unix seconds, of the snapshot last written or restored
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop_event.wait(self.state.config.snapshot_interval_s):
            try:
                self.take("scheduled")
            except Exception:  # noqa: BLE001 - the next one tries again; the shard keeps serving
                metrics.SHARD_SNAPSHOT_FAILURES.labels(shard=str(self.state.config.shard_id)).inc()
                log.exception("snapshot_failed")

    def take(self, reason: str) -> str | None:
        """Write one now unless nothing changed since the last, and it is not half way to
        snapshot_max_age_s (a quiet shard's only snapshot would otherwise age out of use and
        every restart replay the whole partition). Where it was stored, or None."""
        with self._lock:
            max_age = self.state.config.snapshot_max_age_s
            fresh = not max_age or time.time() - self.last_written_at < max_age / 2
            if self.state.applied_offset == self.last_offset and fresh:
                return None
            started = time.monotonic()
            captured = self.state.capture()
            if captured is None:
                return None
            offset, header, sections = captured
            cfg = self.state.config
            location, size = self.store.write(cfg.shard_id, offset, header, sections)
            del sections
            release_free_memory()  # the copy was as large as the index: give its pages back
            self.last_offset, self.last_written_at = offset, header["written_at"]
            metrics.observe_snapshot(cfg.shard_id, time.monotonic() - started, size)
            log.info(
                "snapshot_written",
                reason=reason,
                path=location,
                offset=offset,
                posts=header["index"]["indexed"],
                bytes=size,
                seconds=round(time.monotonic() - started, 3),
            )
            try:
                for old in self.store.prune(cfg.shard_id, cfg.snapshot_keep, cfg.snapshot_max_age_s):
                    log.info("snapshot_pruned", path=old)
            except Exception as exc:  # noqa: BLE001 - written all the same (no delete permission, say)
                log.warning("snapshot_prune_failed", store=self.store.url, error=f"{type(exc).__name__}: {exc}")
            return location

    def load_newest(self) -> bool:
        """Restore the newest intact snapshot that fits this shard; False when there is none."""
        cfg = self.state.config
        for path in self.store.remove_temporaries(cfg.shard_id):
            log.warning("snapshot_temporary_removed", path=str(path))
        try:
            entries = self.store.entries(cfg.shard_id)
        except Exception as exc:  # noqa: BLE001 - an unreachable store (no route, no credentials: botocore
            # raises its own errors): serve from a full replay rather than not at all
            log.error("snapshot_store_unreadable", store=self.store.url, error=f"{type(exc).__name__}: {exc}")
            entries = []
        for entry in entries:
            started = time.monotonic()
            try:
                if self._too_old(entry.location, entry.modified):
                    break  # older ones are older still: replay the partition from its start
                header, sections = self.store.read(entry.location)
                if self._too_old(entry.location, float(header.get("written_at", 0))):
                    break
                self.state.restore(header, sections)
                self.last_written_at = float(header.get("written_at", 0))
            except Exception as exc:  # noqa: BLE001 - corrupt, of another configuration, or unreadable
                # (a store error mid-download): the next-newest, or a full replay
                log.warning("snapshot_skipped", path=entry.location, reason=f"{type(exc).__name__}: {exc}")
                self.state.index = None
                continue
            self.last_offset = self.state.applied_offset
            log.info(
                "snapshot_loaded",
                path=entry.location,
                offset=self.state.applied_offset,
                posts=len(self.state.index),
                seconds=round(time.monotonic() - started, 3),
            )
            return True
        log.info("snapshot_none", store=self.store.url)
        return False

    def _too_old(self, location: str, written_at: float | None) -> bool:
        """Older than snapshot_max_age_s: it could predate a delete whose tombstone compaction
        has dropped since, and restoring it would bring that post back."""
        max_age = self.state.config.snapshot_max_age_s
        if not max_age or written_at is None:
            return False
        age = time.time() - written_at
        if age <= max_age:
            return False
        log.warning("snapshot_too_old", path=location, age_s=round(age), max_age_s=max_age,
                    reason="deletes may have been compacted away since")
        return True
