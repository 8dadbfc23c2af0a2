import base64
import json
import threading
import time
from types import SimpleNamespace

import numpy as np

from feedret.config import ConsumerConfig, KafkaConfig
from feedret.consumer.batch import SourceRecord, dead_letter, next_offsets, route, split_batch, vector_event
from feedret.consumer.service import EmbeddingConsumer
from feedret.routing import shard_of
from feedret.v1 import feedret_pb2 as pb


def rec(offset, value, key=None, partition=0):
    if isinstance(value, dict):
        value = json.dumps(value).encode()
    return SourceRecord("posts", partition, offset, key, value)


POST = {"post_id": 5, "author_id": "a", "text": "hello", "created_at": 1.0, "lang": "en"}


def test_bad_records_are_split_out_with_reasons_and_good_ones_kept():
    batch = [
        rec(0, POST, b"5"),
        rec(1, b"{oops"),
        rec(2, {**POST, "post_id": "x"}),
        rec(3, None),
        rec(4, {**POST, "post_id": 6}, b"7"),
        rec(5, {"post_id": 5, "op": "delete"}, b"5"),
    ]
    good, bad = split_batch(batch)
    assert [g.source.offset for g in good] == [0, 5]
    reasons = {b.source.offset: b.reason for b in bad}
    assert "not valid JSON" in reasons[1]
    assert "post_id must be an integer" in reasons[2]
    assert "tombstone" in reasons[3]
    assert "does not match post_id" in reasons[4]
    # The dead-letter metric's label: one word per fault, from a fixed set.
    assert {b.source.offset: b.kind for b in bad} == {1: "invalid_json", 2: "post_id", 3: "tombstone", 4: "key_mismatch"}


def test_every_validation_failure_has_a_bounded_kind():
    cases = {
        b"[1]": "not_object",
        json.dumps({"author_id": "a"}).encode(): "post_id",
        json.dumps({"post_id": 1, "op": "explode"}).encode(): "op",
        json.dumps({**POST, "text": " "}).encode(): "text",
        json.dumps({**POST, "author_id": 3}).encode(): "author_id",
        json.dumps({**POST, "lang": 3}).encode(): "lang",
        json.dumps({k: v for k, v in POST.items() if k != "created_at"}).encode(): "created_at",
        json.dumps({**POST, "created_at": "yesterday"}).encode(): "created_at",
        json.dumps({**POST, "features": {"likes": "many"}}).encode(): "features",
    }
    _, bad = split_batch([rec(i, value) for i, value in enumerate(cases)])
    assert [b.kind for b in bad] == list(cases.values())


def test_dead_letter_keeps_original_bytes_and_reason():
    _, bad = split_batch([rec(9, b"\xffnot json", b"k")])
    key, value, headers = dead_letter(bad[0])
    body = json.loads(value)
    assert key == b"k" and body["offset"] == 9 and body["topic"] == "posts"
    assert base64.b64decode(body["value_b64"]) == b"\xffnot json"
    assert dict(headers)["feedret-reason"].decode() == body["reason"]


def test_vector_event_round_trips():
    good, _ = split_batch([rec(3, POST, b"5", partition=2)])
    msg = vector_event(good[0], np.array([0.6, 0.8], np.float32), "m1", 10.0)
    back = pb.PostVectorEvent.FromString(msg.SerializeToString())
    assert back.op == pb.PostVectorEvent.UPSERT and back.post_id == 5
    assert list(back.vector) == [np.float32(0.6), np.float32(0.8)]
    assert (back.source_partition, back.source_offset, back.model_version) == (2, 3, "m1")


def test_route_is_the_shard_and_offsets_commit_past_the_batch():
    assert route(12345, 3) == shard_of(12345, 3)
    batch = [rec(4, POST, partition=0), rec(9, POST, partition=1), rec(7, POST, partition=0)]
    assert next_offsets(batch) == {("posts", 0): 8, ("posts", 1): 10}


class ScriptedConsumer:
    """kafka-python's poll as the batcher sees it: each call returns the next scripted list
    of records, or after the script waits out its timeout and returns nothing; `every_s`
    is how long each record takes to arrive."""

    def __init__(self, script: list[list[int]], every_s: float = 0.0) -> None:
        self.script = list(script)
        self.every_s = every_s
        self.timeouts: list[int] = []

    def poll(self, timeout_ms: int, max_records: int):
        self.timeouts.append(timeout_ms)
        if not self.script:
            time.sleep(timeout_ms / 1000)
            return {}
        time.sleep(self.every_s)
        offsets = self.script.pop(0)[:max_records]
        return {("posts", 0): [SimpleNamespace(topic="posts", partition=0, offset=o, key=None, value=b"{}")
                                for o in offsets]}


def batcher(consumer: ScriptedConsumer, **config) -> EmbeddingConsumer:
    service = EmbeddingConsumer(KafkaConfig(), ConsumerConfig(**config), encoder=None)
    service._consumer = consumer
    return service


def test_a_batch_on_a_quiet_stream_closes_after_the_linger_not_the_max_wait():
    consumer = ScriptedConsumer([[0, 1]])
    started = time.monotonic()
    batch = batcher(consumer, batch_max_wait_ms=2000, batch_linger_ms=20)._next_batch(threading.Event())
    assert [r.offset for r in batch] == [0, 1]
    assert time.monotonic() - started < 1.0  # the old batcher waited the full 2 s here
    assert consumer.timeouts[1] <= 20


def test_posts_that_keep_coming_fill_the_batch():
    consumer = ScriptedConsumer([[i] for i in range(10)], every_s=0.005)
    batch = batcher(consumer, batch_max_size=6, batch_max_wait_ms=2000, batch_linger_ms=20)._next_batch(threading.Event())
    assert [r.offset for r in batch] == list(range(6))


def test_a_steady_trickle_is_cut_at_the_max_wait():
    consumer = ScriptedConsumer([[i] for i in range(1000)], every_s=0.01)  # one post every 10 ms < linger
    started = time.monotonic()
    batch = batcher(consumer, batch_max_size=1000, batch_max_wait_ms=150, batch_linger_ms=50)._next_batch(threading.Event())
    elapsed = time.monotonic() - started
    assert 3 <= len(batch) < 1000 and 0.14 <= elapsed < 2.0, (len(batch), elapsed)


def test_a_record_without_a_key_is_dead_lettered_so_no_delete_can_overtake_its_upsert():
    # Kafka spreads keyless records over partitions: 727 of 2,000 keyless deletes were read
    # before their (keyed) upserts and lost, the posts left searchable.
    good, bad = split_batch([rec(0, POST, b"5"), rec(1, {"post_id": 5, "op": "delete"}, None)])
    assert [g.source.offset for g in good] == [0]
    assert [(b.source.offset, b.kind) for b in bad] == [(1, "no_key")]
    assert "no key" in bad[0].reason and "post id (5)" in bad[0].reason


def test_a_record_validation_cannot_read_is_dead_lettered_not_raised(monkeypatch):
    import feedret.consumer.batch as batch

    def explode(raw, limits):
        raise MemoryError("a validator bug")

    monkeypatch.setattr(batch, "parse_post_event", explode)
    good, bad = split_batch([rec(0, POST, b"5")])
    assert not good and bad[0].kind == "unreadable" and "MemoryError" in bad[0].reason


def test_a_dead_letter_of_a_huge_record_fits_a_broker_and_says_what_it_dropped():
    value = b"x" * 5_000_000
    key, body, headers = dead_letter(split_batch([rec(7, value, b"7")])[1][0])
    letter = json.loads(body)
    assert len(body) < 1_000_000  # Kafka's default message.max.bytes
    assert letter["value_truncated"] and letter["value_bytes"] == 5_000_000 and letter["offset"] == 7
    assert letter["kind"] == "too_large"


def test_a_reason_quoting_invalid_unicode_still_makes_a_dead_letter():
    from feedret.consumer.batch import Bad

    key, body, headers = dead_letter(Bad(rec(1, b"{}", b"1"), "bad \ud800 text", "text"))
    assert json.loads(body)["reason"] == "bad \ud800 text"
    assert headers[0][1] == b"bad \\ud800 text"
