"""`feedret stats` reads the embedding group's offsets from Kafka; an unreachable broker must not hang it."""

from __future__ import annotations

import socket
import time

from feedret.config import KafkaConfig
from feedret.topics import group_offsets


def test_an_unreachable_broker_gives_no_offsets_within_seconds():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    assert group_offsets(KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}")) == []
    assert time.monotonic() - started < 10  # kafka-python's default would be 30 s
