import base64
import json

import numpy as np

from feedret.consumer.batch import SourceRecord, dead_letter, next_offsets, route, split_batch, vector_event
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
