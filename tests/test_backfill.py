"""`feedret backfill`'s steps: a bulk file of post events becomes the records the consumer would write."""

from __future__ import annotations

import json

import numpy as np

from feedret.consumer.backfill import backfill
from feedret.routing import shard_of
from feedret.v1 import feedret_pb2 as pb


class Sent:
    def get(self, timeout=None):
        return None


def post(post_id: int, text: str = "a post", **extra) -> str:
    return json.dumps({"post_id": post_id, "op": "upsert", "author_id": "a", "text": text, "created_at": 1.7e9,
                       "lang": "en", **extra})


def embed(posts):
    # A post whose text says "poison" makes the model yield NaN; the rest get a unit vector of their id.
    out = []
    for p in posts:
        v = np.full(4, np.nan) if "poison" in p.text else np.eye(4)[p.post_id % 4]
        out.append(v)
    return np.asarray(out, dtype=np.float32)


def test_each_line_becomes_the_consumers_record_and_bad_lines_are_reported_by_number():
    lines = [post(10), post(11), "", json.dumps({"post_id": 12, "op": "delete"}), "{not json", post(13, "poison"),
             post(-1), post(14)]
    sent: list[tuple[int, bytes, bytes | None]] = []
    progress: list[int] = []
    report = backfill(lines, embed, "m1", 3, lambda p, k, v: (sent.append((p, k, v)), Sent())[1], batch_size=3,
                      source="export.jsonl", progress=progress.append, clock=lambda: 5.0)
    assert report.lines == 7 and report.embedded == 3 and report.deletes == 1
    assert [n for n, _ in report.bad] == [5, 6, 7]  # line numbers in the file, blank lines counted
    assert "not valid JSON" in report.bad[0][1] or "JSON" in report.bad[0][1]
    assert "encoder failed" in report.bad[1][1]
    assert sum(progress) == 7 and len(progress) == 3
    by_key = {k: (p, v) for p, k, v in sent}
    assert set(by_key) == {b"10", b"11", b"12", b"14"}
    for post_id in (10, 11, 12, 14):
        partition, _ = by_key[str(post_id).encode()]
        assert partition == shard_of(post_id, 3)  # the shard's partition, as the consumer routes
    assert by_key[b"12"][1] is None  # a delete is a tombstone
    event = pb.PostVectorEvent.FromString(by_key[b"14"][1])
    assert event.post_id == 14 and event.model_version == "m1" and event.embedded_at == 5.0
    assert list(event.vector) == [0, 0, 1, 0] and event.source_partition == -1 and event.source_offset == 8


def test_a_failed_send_raises_so_the_backfill_is_run_again():
    class Failed:
        def get(self, timeout=None):
            raise RuntimeError("broker gone")

    try:
        backfill([post(1)], embed, "m1", 2, lambda p, k, v: Failed())
    except RuntimeError as exc:
        assert "broker gone" in str(exc)
    else:
        raise AssertionError("a failed send went unnoticed")
