"""Publishing post events (JSON lines) to the `posts` topic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kafka import KafkaProducer

from feedret.config import KafkaConfig
from feedret.events import record_key


@dataclass(frozen=True)
class PublishReport:
    sent: int
    skipped_blank: int
    # (line number, reason) of each line that is not a valid post event; filled with validate=True.
    invalid: tuple[tuple[int, str], ...] = ()


def publish_lines(kafka: KafkaConfig, lines: Iterable[str], validate: bool = False) -> PublishReport:
    """Send each non-blank line as one event. validate=True also judges each line as the
    consumer will, for the report only: an invalid line is still sent (and dead-lettered there)."""
    from feedret.events import InvalidEvent, parse_post_event

    producer = KafkaProducer(
        **kafka.client_options(),
        acks="all",
        linger_ms=10,
        client_id="feedret-publish",
    )
    sent = blank = 0
    invalid: list[tuple[int, str]] = []
    try:
        futures = []
        for line_no, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line.strip():
                blank += 1
                continue
            if validate:
                try:
                    parse_post_event(line)
                except InvalidEvent as exc:
                    invalid.append((line_no, str(exc)))
            futures.append(producer.send(kafka.posts_topic, key=record_key(line), value=line.encode("utf-8")))
            sent += 1
        producer.flush()
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=5)
    return PublishReport(sent=sent, skipped_blank=blank, invalid=tuple(invalid))
