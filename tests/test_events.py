import json

import pytest

from feedret.events import InvalidEvent, parse_post_event

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
