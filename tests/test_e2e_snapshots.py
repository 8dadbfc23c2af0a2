"""Snapshots and recovery on a real stack: a shard SIGKILLed mid-stream restarts from its newest
snapshot, replays only the partition's tail, and ends with exactly the posts it should hold.

The snapshots live in a bucket on a real S3-compatible server (moto, its own process): a
restarted shard has nothing on disk, as a replica on a new node would not."""

from __future__ import annotations

import json
import signal
import threading
import time

import fsspec
import pytest

from feedret.indexer import snapshot as snapshots
from feedret.routing import shard_of
from feedret.server.launcher import Stack

from conftest import RunningStack, post_line, sample_lines, stack_config, wait_for

pytestmark = pytest.mark.e2e

N_POSTS = 300


@pytest.fixture(scope="module")
def snapshotting(tmp_path_factory, s3):
    tmp = tmp_path_factory.mktemp("snapshots")
    fs, _ = fsspec.core.url_to_fs("s3://feedret-e2e")
    fs.mkdir("feedret-e2e")
    url = "s3://feedret-e2e/snapshots/run-1"
    config = stack_config(tmp)
    config.env.update(
        s3,
        FEEDRET_SNAPSHOT_DIR=url,
        FEEDRET_SNAPSHOT_STAGING_DIR=str(tmp / "staging"),
        FEEDRET_SNAPSHOT_INTERVAL_S="0.5",
        FEEDRET_INDEX_FACTORY="HNSW16",  # the graph is snapshotted too, tombstones and all
    )
    with Stack(config) as stack:
        running = RunningStack(stack)
        running.store = snapshots.SnapshotStore(url)
        running.staging = tmp / "staging"
        running.publish(sample_lines(N_POSTS))
        assert wait_for(lambda: running.indexed() >= N_POSTS, timeout=120, interval=0.2)
        yield running
        running.client.close()


def log_events(stack: Stack, name: str, event: str) -> list[dict]:
    out = []
    for line in stack.logs[name].read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == event:
            out.append(obj)
    return out


def shard_stats(running: RunningStack, shard: int):
    return running.client.stats(timeout=2).shards[shard]


def test_a_shard_killed_mid_stream_recovers_from_its_snapshot_with_the_same_posts(snapshotting):
    running, stack = snapshotting, snapshotting.stack
    assert wait_for(lambda: running.store.entries(0), timeout=10)

    sample_ids = [json.loads(line)["post_id"] for line in sample_lines(N_POSTS)]
    new_ids = [9_500_000_000 + i for i in range(300)]
    deleted = sample_ids[:60:3]
    rewritten = sample_ids[1:60:3]

    def stream():
        for batch in range(30):
            lines = [post_line(p, f"streamed post {p} about topic {p % 17}") for p in new_ids[batch * 10 : batch * 10 + 10]]
            if batch % 3 == 0:
                lines += [json.dumps({"post_id": p, "op": "delete"}) for p in deleted[batch // 3 * 2 : batch // 3 * 2 + 2]]
                lines += [post_line(p, f"rewritten post {p}") for p in rewritten[batch // 3 * 2 : batch // 3 * 2 + 2]]
            running.publish(lines)
            time.sleep(0.1)

    publisher = threading.Thread(target=stream)
    publisher.start()
    time.sleep(1.0)
    stack.kill("shard-0", signal.SIGKILL)  # mid-stream, with snapshots written every 0.5 s
    stack.start_role("shard-0")
    stack.wait_serving(["shard-0"], 60)
    publisher.join(30)

    loaded = log_events(stack, "shard-0", "snapshot_loaded")
    assert loaded and loaded[-1]["offset"] > 0, "the restarted shard did not start from a snapshot"
    assert loaded[-1]["path"].startswith("feedret-e2e/snapshots/run-1/shard-0-"), loaded[-1]["path"]

    expected = {p for p in set(sample_ids + new_ids) - set(deleted) if shard_of(p, 2) == 0}
    gone = {p for p in deleted if shard_of(p, 2) == 0}
    assert wait_for(lambda: shard_stats(running, 0).indexed == len(expected), timeout=30, interval=0.2), (
        shard_stats(running, 0).indexed, len(expected))
    found = {p for p in expected | gone if running.client.lookup(p).found}
    assert found == expected  # the same id set: nothing lost, nothing deleted came back
    # Its replay started at the snapshot's offset, not at the beginning of the partition.
    started = log_events(stack, "shard-0", "applier_started")
    assert started[-1]["offset"] == loaded[-1]["offset"] > 0


def test_a_clean_stop_writes_a_final_snapshot_and_the_restart_replays_nothing(snapshotting):
    running, stack = snapshotting, snapshotting.stack
    before = shard_stats(running, 1)
    offset = before.applied[0].offset
    stack.kill("shard-1", signal.SIGTERM)
    newest = running.store.entries(1)[0]
    assert newest.offset == offset and newest.name == snapshots.snapshot_path(".", 1, offset).name
    # Staged files go once uploaded or read: nothing of the shards' is left on local disk.
    assert not [p for p in running.staging.rglob("*") if p.is_file()]
    stack.start_role("shard-1")
    stack.wait_serving(["shard-1"], 60)
    assert log_events(stack, "shard-1", "snapshot_loaded")[-1]["offset"] == offset
    after = shard_stats(running, 1)
    assert (after.indexed, after.applied[0].offset, after.index_type) == (before.indexed, offset, "HNSW16")
    assert after.tombstones == before.tombstones
