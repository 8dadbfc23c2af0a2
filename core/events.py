"""Post events on the `posts` topic: parsing and validation.

A post event is one JSON object (UTF-8), keyed by the post id:

    {"post_id": 123, "op": "upsert", "author_id": "a9", "text": "...",
     "created_at": 1700000000.0, "lang": "en",
     "features": {"author_followers": 1200, "likes": 31, "comments": 4}}

`parse_post_event` turns the raw bytes into a `PostEvent` or raises
`InvalidEvent` with a reason a human can act on; the consumer sends those to
the dead-letter topic. Pure: no Kafka, no model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

MAX_POST_ID = 2**63 - 1
MAX_TEXT_CHARS = 20_000
OPS = ("upsert", "delete")


class InvalidEvent(ValueError):
    """A post event that cannot be indexed; the message says why.

    `kind` names the fault in a word, from a small fixed set (the field at fault,
    `invalid_json` or `not_object`), so it can label a metric.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PostEvent:
    post_id: int
    op: str  # "upsert" or "delete"
    author_id: str = ""
    text: str = ""
    created_at: float = 0.0  # Unix seconds
    lang: str = ""
    features: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"post_id": self.post_id, "op": self.op}
        if self.op == "upsert":
            out.update(
                author_id=self.author_id,
                text=self.text,
                created_at=self.created_at,
                lang=self.lang,
                features=dict(self.features),
            )
        return out


def _post_id(value: Any) -> int:
    # bool is an int in Python; a post id of `true` is a producer bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(f"post_id must be an integer, got {type(value).__name__}", "post_id")
    if not 0 <= value <= MAX_POST_ID:
        raise InvalidEvent(f"post_id must be in [0, 2^63-1], got {value}", "post_id")
    return value


def _timestamp(value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidEvent("created_at must be Unix seconds or an ISO-8601 string, got bool", "created_at")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise InvalidEvent(f"created_at is not an ISO-8601 timestamp: {value!r}", "created_at") from exc
    else:
        raise InvalidEvent(
            f"created_at must be Unix seconds or an ISO-8601 string, got {type(value).__name__}", "created_at"
        )
    if not math.isfinite(ts) or ts < 0:
        raise InvalidEvent(f"created_at must be a finite, non-negative time, got {value!r}", "created_at")
    return ts


def _string(obj: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise InvalidEvent(f"missing required field {key!r}", key)
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidEvent(f"{key} must be a string, got {type(value).__name__}", key)
    return value


def _features(value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent(f"features must be an object of numbers, got {type(value).__name__}", "features")
    out: dict[str, float] = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise InvalidEvent(f"features.{name} must be a number, got {type(number).__name__}", "features")
        if not math.isfinite(number):
            raise InvalidEvent(f"features.{name} must be finite, got {number}", "features")
        out[str(name)] = float(number)
    return out


def parse_post_event(raw: bytes | str | Mapping[str, Any]) -> PostEvent:
    """Validate one post event. Raises InvalidEvent with the reason."""
    if isinstance(raw, Mapping):
        obj = raw
    else:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidEvent(f"not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(obj, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(obj).__name__}", "not_object")
    if "post_id" not in obj:
        raise InvalidEvent("missing required field 'post_id'", "post_id")
    post_id = _post_id(obj["post_id"])
    op = obj.get("op", "upsert")
    if op not in OPS:
        raise InvalidEvent(f"op must be one of {list(OPS)}, got {op!r}", "op")
    if op == "delete":
        return PostEvent(post_id=post_id, op="delete")

    text = _string(obj, "text", required=True)
    if not text.strip():
        raise InvalidEvent("text must not be empty", "text")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidEvent(f"text is {len(text)} characters, the limit is {MAX_TEXT_CHARS}", "text")
    if "created_at" not in obj:
        raise InvalidEvent("missing required field 'created_at'", "created_at")
    return PostEvent(
        post_id=post_id,
        op="upsert",
        author_id=_string(obj, "author_id", required=True),
        text=text,
        created_at=_timestamp(obj["created_at"]),
        lang=_string(obj, "lang", required=False).lower(),
        features=_features(obj.get("features")),
    )
