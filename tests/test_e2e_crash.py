"""Crash test: the consumer, a shard and the root are SIGKILLed at seeded-random moments
while a few thousand post events (upserts, deletes, re-upserts) stream in; the launcher
restarts them. Once everything has caught up, the index must equal what the log says:
no live post missing, no deleted post present, every re-upserted post holding the vector
of its last text, and every post indexed once.

Reproduce a failure with FEEDRET_CRASH_SEED=<the seed in its message>.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from feedret.clients.client import FeedretClient
from feedret.config import EncoderConfig
from feedret.events import parse_post_event
from feedret.routing import shard_of
from feedret.server.launcher import Stack

from conftest import RunningStack, stack_config, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(280)]

SEED = int(os.environ.get("FEEDRET_CRASH_SEED", "14"))
NUM_SHARDS = 2
N_IDS = 1500
N_EVENTS = 2600
CHUNK = 200
BASE_ID = 7_300_000_000
WORDS = (
    "bread sourdough oven chess opening gambit tomato balcony garden kite wind beach jazz piano chord "
    "bike mountain trail tax return refund rocket launch orbit dragon castle knight recipe curry spice "
    "river kayak rapids violin concerto sonata robot sensor circuit glacier volcano lava coffee espresso "
    "marathon sprint hurdle painting canvas fresco poem sonnet haiku train station tunnel whale dolphin "
    "reef bridge cable tower election ballot senate vaccine virus cell galaxy nebula comet startup funding "
    "merger football goal keeper tennis serve volley camera lens shutter novel chapter mystery"
).split()
AUTHORS = [f"author:{i}" for i in range(25)]
LANGS = ["en", "en", "en", "fr", "de", "es"]


def make_log(seed: int) -> tuple[list[str], dict[int, list[dict]]]:
    """A seeded event log: the JSON lines in publish order, and per post id its events in order.

    Post ids are first upserted, then deleted (only while live) or re-upserted with a new
    text (live or deleted) at random; every upsert's text is new for its post.
    """
    rng = random.Random(seed)
    unseen = [BASE_ID + i for i in range(N_IDS)]
    rng.shuffle(unseen)
    seen: list[int] = []
    live: set[int] = set()
    history: dict[int, list[dict]] = {}
    lines: list[str] = []

    def upsert(pid: int) -> dict:
        version = len(history.get(pid, ()))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        return {
            "post_id": pid, "op": "upsert", "author_id": rng.choice(AUTHORS),
            "text": f"{words} (post {pid}, version {version})",
            "created_at": 1_760_000_000 + rng.randint(0, 5_000_000), "lang": rng.choice(LANGS),
            "features": {"engagements": rng.randint(0, 5000), "mean_weight": round(rng.uniform(0, 5), 2)},
        }

    while len(lines) < N_EVENTS:
        r = rng.random()
        if unseen and (r < 0.56 or not seen):
            pid = unseen.pop()
            seen.append(pid)
            event = upsert(pid)
        elif r < 0.76 and live:
            pid = rng.choice(seen)
            while pid not in live:
                pid = rng.choice(seen)
            event = {"post_id": pid, "op": "delete"}
        else:
            pid = rng.choice(seen)  # live or deleted: either way this upsert must win
            event = upsert(pid)
        (live.add if event["op"] == "upsert" else live.discard)(pid)
        history.setdefault(pid, []).append(event)
        lines.append(json.dumps(event))
    return lines, history


def committed_total(admin: KafkaAdminClient, group: str) -> int:
    """The consumer group's committed offsets on `posts`, summed over partitions (-1 when unknown)."""
    try:
        offsets = admin.list_group_offsets(group)
    except Exception:  # noqa: BLE001 - the broker is busy or the group is rebalancing: ask again
        return -1
    group_offsets = offsets.get(group, offsets) if isinstance(offsets, dict) else {}
    return sum(max(om.offset, 0) for tp, om in group_offsets.items() if tp.topic == "posts")


def partition_ends(bootstrap: str, topic: str, partitions: int, timeout: float = 20.0) -> list[int]:
    """The true end (high watermark) of each partition, from fetch answers.

    ListOffsets alone is not enough: the embedded broker answers it with where the last
    batch starts (see feedret.indexer.applier.CatchUp). So read from there to the end.
    """
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=100, client_id="crash-test-probe")
    try:
        consumer.assign(tps)
        listed = consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, listed.get(tp) or 0)
        deadline = time.monotonic() + timeout
        while True:
            consumer.poll(timeout_ms=200)
            marks = [consumer.highwater(tp) for tp in tps]
            if all(m is not None for m in marks) and all(consumer.position(tp) >= m for tp, m in zip(tps, marks)):
                return marks
            assert time.monotonic() < deadline, f"no high watermark for {topic} after {timeout}s: {marks}"
    finally:
        consumer.close()


class Restarter(threading.Thread):
    """What `feedret up` does while it serves: restart every process that exited."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(name="restarter", daemon=True)
        self.stack = stack
        self.stop_event = threading.Event()
        self.restarted: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            try:
                for exit_ in self.stack.supervise():  # the launcher's supervision loop, one round
                    self.restarted.append(exit_.process if exit_.action == "restart"
                                          else f"{exit_.process} ({exit_.action})")
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc
                return


def embed_lines(events: list[dict]) -> np.ndarray:
    """The vectors the consumer makes of these upserts: the same model, prompts and settings."""
    import torch

    from feedret.encoder.model import Encoder

    cfg = EncoderConfig()
    threads = torch.get_num_threads()
    try:
        encoder = Encoder.from_pretrained(cfg.model_dir, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                          torch_threads=1)
        return encoder.embed_posts([parse_post_event(json.dumps(e)) for e in events])
    finally:
        torch.set_num_threads(threads)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sigkilled_consumer_shard_and_root_leave_the_index_equal_to_the_log(tmp_path):
    lines, history = make_log(SEED)
    last = {pid: events[-1] for pid, events in history.items()}
    live = {pid for pid, e in last.items() if e["op"] == "upsert"}
    deleted = set(last) - live
    reupserted = sorted(pid for pid in live if sum(e["op"] == "upsert" for e in history[pid]) > 1)
    chunks = [lines[i : i + CHUNK] for i in range(0, len(lines), CHUNK)]
    n_deletes = sum(json.loads(line)["op"] == "delete" for line in lines)
    assert len(deleted) > 50 and len(reupserted) > 100 and n_deletes > 300, (len(deleted), len(reupserted))
    # Deleted posts that came back: delete then upsert, the upsert last.
    assert sum(any(e["op"] == "delete" for e in history[p]) for p in live) > 20

    # When each victim dies: once the consumer has committed a seeded fraction of the log
    # (10-70%), after a seeded jitter; the consumer, one shard and the root, in seeded order.
    krng = random.Random(SEED + 1)
    shard_victim = f"shard-{krng.randrange(NUM_SHARDS)}"
    victims = ["consumer", shard_victim, "root"]
    krng.shuffle(victims)
    triggers = sorted(krng.uniform(0.1, 0.7) for _ in victims)
    plan = [(name, int(frac * N_EVENTS), round(krng.uniform(0.0, 0.4), 3)) for name, frac in zip(victims, triggers)]
    pace = [krng.uniform(0.02, 0.25) for _ in chunks]  # pauses between chunks: the log spreads over the kills
    where = f"seed {SEED}, kill plan {plan}"

    config = stack_config(tmp_path, NUM_SHARDS)
    config.snapshot_interval_s = 1.0  # a restarted shard loads a snapshot, then replays the tail
    started = time.monotonic()
    with Stack(config) as stack:
        running = RunningStack(stack)
        group = stack.kafka.consumer_group
        admin = KafkaAdminClient(bootstrap_servers=stack.kafka.bootstrap_servers, client_id="crash-test-admin",
                                 request_timeout_ms=5000)
        restarter = Restarter(stack)
        restarter.start()
        pids_before = {name: stack.procs[name].pid for name in victims}
        try:
            published = threading.Event()
            publish_error: list[BaseException] = []

            def publish() -> None:
                try:
                    # All but the last chunk: that one goes out after the last kill, so every
                    # victim dies with more of the log still to come.
                    for chunk, pause in zip(chunks[:-1], pace):
                        running.publish(chunk)
                        time.sleep(pause)
                except BaseException as exc:  # noqa: BLE001
                    publish_error.append(exc)
                finally:
                    published.set()

            publisher = threading.Thread(target=publish, name="publisher", daemon=True)
            publisher.start()
            killed_at = {}
            for name, at_offset, jitter in plan:
                assert wait_for(lambda: committed_total(admin, group) >= at_offset, timeout=120, interval=0.05), (
                    f"{where}: the consumer never committed {at_offset} events (committed "
                    f"{committed_total(admin, group)}); consumer log:\n{stack.log_tail('consumer')}")
                time.sleep(jitter)  # a seeded-random moment, not a wait for anything
                killed_at[name] = committed_total(admin, group)
                os.kill(stack.procs[name].pid, signal.SIGKILL)
            assert published.wait(120) and not publish_error, publish_error
            publisher.join(10)
            running.publish(chunks[-1])

            # Everything restarted and caught up: the consumer committed the whole log,
            # each shard applied its partition of post-vectors to its end and is SERVING.
            assert wait_for(lambda: all(stack.procs[n].pid != pids_before[n] for n in victims), timeout=30), (
                f"{where}: not all victims were restarted: {restarter.restarted} {restarter.error}")
            assert restarter.error is None, restarter.error
            stack.wait_serving(["root", *config.shard_names()], 120)
            assert wait_for(lambda: committed_total(admin, group) == N_EVENTS, timeout=150, interval=0.2), (
                f"{where}: the consumer committed {committed_total(admin, group)} of {N_EVENTS} events; "
                f"consumer log:\n{stack.log_tail('consumer')}")
            ends = partition_ends(stack.kafka.bootstrap_servers, stack.kafka.vectors_topic, NUM_SHARDS)
            assert sum(ends) >= N_EVENTS, (where, ends)  # every event became a vector event (or more: replays)
            client = FeedretClient(config.root_address)

            def caught_up() -> bool:
                try:
                    shards = client.stats(timeout=3).shards
                except grpc.RpcError:
                    return False
                return len(shards) == NUM_SHARDS and all(
                    s.reachable and s.ready and s.applied and s.applied[0].offset >= ends[s.shard] for s in shards)

            assert wait_for(caught_up, timeout=120, interval=0.2), (
                f"{where}: shards did not catch up with post-vectors ends {ends}: {client.stats(timeout=3)}")
            caught_up_s = time.monotonic() - started

            # The index against the log.
            def look(pid: int):
                return pid, client.lookup(pid, include_vector=pid in reupserted_set)

            reupserted_set = set(reupserted)
            with ThreadPoolExecutor(4) as pool:
                info = dict(pool.map(look, sorted(last)))
            missing = sorted(p for p in live if not info[p].found)
            present = sorted(p for p in deleted if info[p].found)
            wrong_shard = sorted(p for p in live if info[p].found and info[p].shard != shard_of(p, NUM_SHARDS))
            stats = client.stats(timeout=5)
            loaded = [json.loads(line)["offset"] for line in stack.logs[shard_victim].read_text().splitlines()
                      if '"snapshot_loaded"' in line]
            counts = (f"{where}: {sum(ends) - N_EVENTS} vector events replayed, {shard_victim} restarted from "
                      f"snapshot offsets {loaded}; {len(live)} live, {len(deleted)} deleted, "
                      f"{len(reupserted)} re-upserted; "
                      f"{len(missing)} missing (e.g. {missing[:5]}), {len(present)} deleted-but-present "
                      f"(e.g. {present[:5]}), indexed {stats.total_indexed} "
                      f"({[s.indexed for s in stats.shards]}), restarted {restarter.restarted}, "
                      f"committed when killed {killed_at}")
            print(counts)
            assert not missing, counts
            assert not present, counts
            assert not wrong_shard, counts
            assert stats.total_indexed == len(live), counts
            # The metadata is the last upsert's too.
            stale_meta = [(p, info[p].lang, info[p].created_at) for p in sorted(live)
                          if (info[p].lang, info[p].created_at) != (last[p]["lang"], float(last[p]["created_at"]))]
            assert not stale_meta, (f"{where}: lang/created_at not of the last upsert "
                                    f"(post, lang, created_at): {stale_meta[:10]}")
            for s in stats.shards:
                assert s.indexed == sum(shard_of(p, NUM_SHARDS) == s.shard for p in live), counts

            # Re-upserts won: each indexed vector is the one of the post's last text (not an earlier one).
            prev = [next(e for e in reversed(history[p][:-1]) if e["op"] == "upsert") for p in reupserted]
            vecs = embed_lines([last[p] for p in reupserted] + prev)
            last_vecs, prev_vecs = vecs[: len(reupserted)], vecs[len(reupserted) :]
            stale = []
            for pid, want, old in zip(reupserted, last_vecs, prev_vecs):
                got = info[pid].vector
                if len(got) == 0 or not cosine(got, want) > 0.999:
                    stale.append((pid, round(cosine(got, want), 4) if len(got) else None,
                                  round(cosine(got, old), 4) if len(got) else None))
            assert not stale, (f"{where}: {len(stale)} of {len(reupserted)} re-upserted posts do not hold their "
                               f"last vector (post, cosine to last, cosine to previous): {stale[:10]}")
            # The check can tell versions apart: most previous versions are far from the last.
            distinct = sum(cosine(a, b) < 0.99 for a, b in zip(last_vecs, prev_vecs))
            assert distinct > 0.9 * len(reupserted), (distinct, len(reupserted))
            print(f"crash test: caught up {caught_up_s:.1f}s after start; {counts}")
            client.close()
        finally:
            restarter.stop_event.set()
            restarter.join(5)
            admin.close()
            running.client.close()
