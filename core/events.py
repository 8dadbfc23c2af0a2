"""Post events on the `posts` topic: parsing and validation.

A post event is one JSON object (UTF-8), keyed by the post id:

    {"post_id": 123, "op": "upsert", "author_id": "a9", "text": "...",
     "created_at": 1700000000.0, "lang": "en",
     "features": {"author_followers": 1200, "likes": 31, "comments": 4}}

`parse_post_event` turns the raw bytes into a `PostEvent` or raises
`InvalidEvent` with a reason a human can act on; the consumer sends those to
the dead-letter topic. Pure: no Kafka, no model.

It accepts only what the encoder can take, so that no record reaches a
forward pass it would fail (and, failing, hold up every record behind it):
valid Unicode (no lone surrogates, which JSON's `\\ud800` escapes can carry),
bounded size for the record and every string in it, and numbers a float can hold.
`EventLimits` holds the bounds.
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


@dataclass(frozen=True)
class EventLimits:
    """How large one post event may be.

    The prompt is cut to the model's max_length tokens, so past a few thousand
    characters a field only costs tokenizer time (a 900 KB author id made its
    batch of 64 take 4.7x longer); the record bound also keeps its dead letter
    within a broker's default 1 MB message size.
    """

    max_record_bytes: int = 256 * 1024
    max_text_chars: int = MAX_TEXT_CHARS
    max_author_id_chars: int = 256
    max_lang_chars: int = 35  # the longest BCP 47 tag in practice
    max_features: int = 64
    max_feature_name_chars: int = 64


DEFAULT_LIMITS = EventLimits()


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


def _finite(value: int | float, what: str, kind: str) -> float:
    try:
        number = float(value)  # an int of hundreds of digits overflows here
    except OverflowError as exc:
        raise InvalidEvent(f"{what} is too large for a float", kind) from exc
    if not math.isfinite(number):
        raise InvalidEvent(f"{what} must be finite, got {number}", kind)
    return number


def _timestamp(value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidEvent("created_at must be Unix seconds or an ISO-8601 string, got bool", "created_at")
    if isinstance(value, (int, float)):
        ts = _finite(value, "created_at", "created_at")
    elif isinstance(value, str):
        if len(value) > 64:
            raise InvalidEvent(f"created_at is {len(value)} characters, not an ISO-8601 timestamp", "created_at")
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError) as exc:
            raise InvalidEvent(f"created_at is not an ISO-8601 timestamp: {value!r}", "created_at") from exc
    else:
        raise InvalidEvent(
            f"created_at must be Unix seconds or an ISO-8601 string, got {type(value).__name__}", "created_at"
        )
    if not math.isfinite(ts) or ts < 0:
        raise InvalidEvent(f"created_at must be a finite, non-negative time, got {value!r}", "created_at")
    return ts


def _unicode(value: str, what: str, kind: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise InvalidEvent(f"{what} is {len(value)} characters, the limit is {max_chars}", kind)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate: JSON can escape one, UTF-8 and every tokenizer refuse it.
        raise InvalidEvent(
            f"{what} is not valid Unicode: lone surrogate at character {exc.start}", kind
        ) from exc
    return value


def _string(obj: Mapping[str, Any], key: str, max_chars: int) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidEvent(f"{key} must be a string, got {type(value).__name__}", key)
    return _unicode(value, key, key, max_chars)


def _features(value: Any, limits: EventLimits) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent(f"features must be an object of numbers, got {type(value).__name__}", "features")
    if len(value) > limits.max_features:
        raise InvalidEvent(f"features has {len(value)} entries, the limit is {limits.max_features}", "features")
    out: dict[str, float] = {}
    for name, number in value.items():
        name = _unicode(str(name), "a feature name", "features", limits.max_feature_name_chars)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise InvalidEvent(f"features.{name} must be a number, got {type(number).__name__}", "features")
        out[name] = _finite(number, f"features.{name}", "features")
    return out


REQUIRED_FOR_UPSERT = ("author_id", "text", "created_at")


def parse_post_event(raw: bytes | str | Mapping[str, Any], limits: EventLimits = DEFAULT_LIMITS) -> PostEvent:
    """Validate one post event. Raises InvalidEvent with the reason."""
    if isinstance(raw, Mapping):
        obj = raw
    else:
        if len(raw) > limits.max_record_bytes:
            raise InvalidEvent(
                f"record is {len(raw)} bytes, the limit is {limits.max_record_bytes}", "too_large"
            )
        try:
            obj = json.loads(raw)
        except RecursionError as exc:
            raise InvalidEvent("not valid JSON: nested too deeply", "invalid_json") from exc
        except ValueError as exc:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is an integer
            # literal past Python's digit limit (4,300 digits).
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

    missing = [key for key in REQUIRED_FOR_UPSERT if obj.get(key) is None]
    if missing:
        # Every missing field at once, so a producer fixes them in one round.
        names = ", ".join(repr(key) for key in missing)
        raise InvalidEvent(f"missing required field{'s' if len(missing) > 1 else ''} {names}", missing[0])
    text = _string(obj, "text", limits.max_text_chars)
    if not text.strip():
        raise InvalidEvent("text must not be empty", "text")
    return PostEvent(
        post_id=post_id,
        op="upsert",
        author_id=_string(obj, "author_id", limits.max_author_id_chars),
        text=text,
        created_at=_timestamp(obj["created_at"]),
        lang=_string(obj, "lang", limits.max_lang_chars).lower(),
        features=_features(obj.get("features"), limits),
    )


def record_key(line: str) -> bytes | None:
    """The post id as the record key, so all events of a post share a partition and stay in order.

    Lines that are not JSON objects with a post_id get none: they are still sent (by
    `feedret publish`), unkeyed, and the consumer, the one place that judges events,
    dead-letters them with the reason.
    """
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and "post_id" in obj and not isinstance(obj["post_id"], (dict, list)):
        return str(obj["post_id"]).encode()
    return None
