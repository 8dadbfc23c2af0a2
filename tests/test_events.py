import json

import pytest

from feedret.events import InvalidEvent, parse_post_event
from feedret.v1 import feedret_pb2 as pb
from feedret.vector_events import UndecodableRecord, decode_record

GOOD = {
    "post_id": 42,
    "op": "upsert",
    "author_id": "a1",
    "text": "Hiring ML engineers",
    "created_at": 1700000000,
    "lang": "EN",
    "features": {"author_followers": 1200, "likes": 3},
}


def test_good_event_parses():
    ev = parse_post_event(json.dumps(GOOD).encode())
    assert ev.post_id == 42 and ev.op == "upsert" and ev.lang == "en"
    assert ev.features == {"author_followers": 1200.0, "likes": 3.0}


def test_iso_timestamp_and_default_op():
    obj = {k: v for k, v in GOOD.items() if k != "op"}
    obj["created_at"] = "2023-11-14T22:13:20Z"
    ev = parse_post_event(obj)
    assert ev.op == "upsert" and ev.created_at == 1700000000.0


def test_delete_needs_only_the_id():
    ev = parse_post_event(b'{"post_id": 9, "op": "delete"}')
    assert ev.op == "delete" and ev.post_id == 9


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"op": "upsert"}', "post_id"),
        (json.dumps({**GOOD, "post_id": "42"}).encode(), "post_id must be an integer"),
        (json.dumps({**GOOD, "post_id": -1}).encode(), "post_id must be in"),
        (json.dumps({**GOOD, "post_id": True}).encode(), "post_id must be an integer"),
        (json.dumps({**GOOD, "op": "update"}).encode(), "op must be one of"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "text"}).encode(), "'text'"),
        (json.dumps({**GOOD, "text": 5}).encode(), "text must be a string"),
        (json.dumps({**GOOD, "text": "  "}).encode(), "text must not be empty"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "created_at"}).encode(), "created_at"),
        (json.dumps({**GOOD, "created_at": "yesterday"}).encode(), "ISO-8601"),
        (json.dumps({**GOOD, "features": {"likes": "many"}}).encode(), "features.likes must be a number"),
        (json.dumps({**GOOD, "features": [1]}).encode(), "features must be an object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_events_say_why(raw, reason):
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        parse_post_event(raw)


HOSTILE = {
    # Each passed validation before, then failed its embedding batch, and the consumer
    # retried that batch forever: no post behind it was indexed.
    "lone surrogate in text": (b'{"post_id": 1, "author_id": "a", "created_at": 1, "text": "hi \\ud800"}', "text", "lone surrogate"),
    "lone surrogate in author_id": (b'{"post_id": 1, "author_id": "\\udfff", "created_at": 1, "text": "hi"}', "author_id", "lone surrogate"),
    "lone surrogate in lang": (b'{"post_id": 1, "author_id": "a", "created_at": 1, "text": "hi", "lang": "e\\ud800"}', "lang", "lone surrogate"),
    "lone surrogate in a feature name": (
        b'{"post_id": 1, "author_id": "a", "created_at": 1, "text": "hi", "features": {"\\ud800": 1}}', "features", "lone surrogate"),
    "nested 100,000 deep": (b'{"post_id": 1, "extra": ' + b"[" * 100_000 + b"}", "invalid_json", "nested too deeply"),
    "post_id of 5,000 digits": (b'{"post_id": ' + b"9" * 5000 + b"}", "invalid_json", "not valid JSON"),
    "post_id of 4,000 digits": (b'{"post_id": ' + b"9" * 4000 + b"}", "post_id", "post_id must be in"),
    "feature of 400 digits": (
        b'{"post_id": 1, "author_id": "a", "created_at": 1, "text": "hi", "features": {"x": 1' + b"0" * 400 + b"}}",
        "features", "too large"),
    "created_at of 400 digits": (b'{"post_id": 1, "author_id": "a", "text": "hi", "created_at": 1' + b"0" * 400 + b"}",
                                 "created_at", "too large"),
    "900 KB author_id": (json.dumps({**GOOD, "author_id": "x" * 900_000}).encode(), "too_large", "bytes, the limit"),
    "5 KB author_id": (json.dumps({**GOOD, "author_id": "x" * 5_000}).encode(), "author_id", "the limit is 256"),
    "1 KB lang": (json.dumps({**GOOD, "lang": "x" * 1_000}).encode(), "lang", "the limit is 35"),
    "1,000 features": (json.dumps({**GOOD, "features": {f"f{i}": i for i in range(1000)}}).encode(), "features", "the limit is 64"),
}


@pytest.mark.parametrize("raw, kind, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_what_the_encoder_cannot_take_is_rejected_with_a_reason(raw, kind, message):
    with pytest.raises(InvalidEvent, match=message) as err:
        parse_post_event(raw)
    assert err.value.kind == kind


def test_every_missing_required_field_is_named():
    with pytest.raises(InvalidEvent, match="missing required fields 'author_id', 'created_at'") as err:
        parse_post_event({"post_id": 3, "text": "hello"})
    assert err.value.kind == "author_id"


def test_the_limits_are_the_callers_to_choose():
    from feedret.events import EventLimits

    raw = json.dumps({**GOOD, "author_id": "x" * 300}).encode()
    assert parse_post_event(raw, EventLimits(max_author_id_chars=300)).author_id == "x" * 300


def test_a_tombstone_on_post_vectors_deletes_the_post_its_key_names():
    assert decode_record(b"9223372036854775807", None).post_id == 2**63 - 1
    ev = decode_record(b"123456789012", None)
    assert ev.post_id == 123456789012 and ev.op == pb.PostVectorEvent.DELETE
    upsert = pb.PostVectorEvent(post_id=7, op=pb.PostVectorEvent.UPSERT, vector=[0.5, 0.5])
    assert decode_record(b"7", upsert.SerializeToString()) == upsert
    for key in (None, b"", b"not-a-number", b"\xff\xfe", b"-3", b" 7 ", b"1_000", b"99999999999999999999999",
                b"9223372036854775808"):
        with pytest.raises(UndecodableRecord):
            decode_record(key, None)
