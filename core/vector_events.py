"""Reading the `post-vectors` topic: its records are PostVectorEvent messages (feedret.proto,
the one definition both ends share), built by the consumer (feedret.consumer.batch.vector_event)
and decoded here for a shard replica. Protobuf only, no gRPC.

A delete is a Kafka tombstone: the post id as key, no value. On a compacted topic
(cleanup.policy=compact) Kafka then drops the post's earlier records and, after the
topic's delete.retention.ms, the tombstone itself, so a replay reads live posts only.
A delete written as a PostVectorEvent with op DELETE (before tombstones) still decodes.
"""

from __future__ import annotations

import re

from google.protobuf.message import DecodeError

from feedret.events import MAX_POST_ID
from feedret.v1 import feedret_pb2 as pb


class UndecodableRecord(ValueError):
    """A record's value is not a PostVectorEvent; the replica skips it."""


_POST_ID_KEY = re.compile(rb"\d{1,19}")


def decode_record(key: bytes | None, value: bytes | None) -> pb.PostVectorEvent:
    """A post-vector record as a PostVectorEvent: a tombstone (no value) deletes the post its key names."""
    if value is None:
        if key is None or not _POST_ID_KEY.fullmatch(key) or int(key) > MAX_POST_ID:
            raise UndecodableRecord(f"a tombstone whose key is not a post id (decimal, 0 to 2^63-1): {key[:32] if key else key!r}")
        return pb.PostVectorEvent(post_id=int(key), op=pb.PostVectorEvent.DELETE)
    return decode(value)


def decode(value: bytes) -> pb.PostVectorEvent:
    """A post-vector record's value as a PostVectorEvent; UndecodableRecord when it is not one."""
    ev = pb.PostVectorEvent()
    try:
        ev.ParseFromString(value)
    except DecodeError as exc:
        raise UndecodableRecord(str(exc)) from exc
    return ev
