"""Reading the `post-vectors` topic: its records are PostVectorEvent messages (feedret.proto,
the one definition both ends share), built by the consumer (feedret.consumer.batch.vector_event)
and decoded here for a shard replica. Protobuf only, no gRPC.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from feedret.v1 import feedret_pb2 as pb


class UndecodableRecord(ValueError):
    """A record's value is not a PostVectorEvent; the replica skips it."""


def decode(value: bytes) -> pb.PostVectorEvent:
    """A post-vector record's value as a PostVectorEvent; UndecodableRecord when it is not one."""
    ev = pb.PostVectorEvent()
    try:
        ev.ParseFromString(value)
    except DecodeError as exc:
        raise UndecodableRecord(str(exc)) from exc
    return ev
