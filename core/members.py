"""The member as the encoder sees it, independent of gRPC."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from feedret.events import MAX_POST_ID

if TYPE_CHECKING:
    from feedret.config import MemberLimits


@dataclass(frozen=True)
class ActivityItem:
    post_id: int
    text: str
    action: str = ""
    timestamp: float = 0.0


@dataclass(frozen=True)
class MemberProfile:
    member_id: str
    session_id: str = ""
    profile: Mapping[str, str] = field(default_factory=dict)
    features: Mapping[str, float] = field(default_factory=dict)
    # Most recent first.
    recent_activity: Sequence[ActivityItem] = ()

    @classmethod
    def from_proto(cls, member: Any) -> "MemberProfile":
        return cls(
            member_id=member.member_id,
            session_id=member.session_id,
            profile=dict(member.profile),
            features=dict(member.features),
            recent_activity=tuple(
                ActivityItem(a.post_id, a.text, a.action, a.timestamp)
                for a in member.recent_activity
            ),
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "MemberProfile":
        """From the JSON a user types on the command line (same field names as the proto).

        InvalidMember, naming the field, for a wrong type or an unknown field.
        """
        _check_json(obj)
        return cls(
            member_id=str(obj.get("member_id", "")),
            session_id=str(obj.get("session_id", "")),
            profile={str(k): str(v) for k, v in (obj.get("profile") or {}).items()},
            features={str(k): float(v) for k, v in (obj.get("features") or {}).items()},
            recent_activity=tuple(
                ActivityItem(
                    int(a.get("post_id", 0)),
                    str(a.get("text", "")),
                    str(a.get("action", "")),
                    float(a.get("timestamp", 0.0)),
                )
                for a in (obj.get("recent_activity") or [])
            ),
        )

    def fill_proto(self, member: Any) -> Any:
        member.member_id = self.member_id
        member.session_id = self.session_id
        member.profile.update(self.profile)
        member.features.update(self.features)
        for a in self.recent_activity:
            member.recent_activity.add(
                post_id=a.post_id, text=a.text, action=a.action, timestamp=a.timestamp
            )
        return member


class InvalidMember(ValueError):
    """A member over a size limit, or with a number that is not finite; the message names the field."""


def _name(key: str) -> str:
    # A key can itself be the oversized part: quote only its start.
    return repr(key if len(key) <= 40 else key[:40] + "...")


def check_member(member: Any, limits: "MemberLimits") -> None:
    """Raise InvalidMember unless every field is within `limits` and every number finite.

    `member`: a MemberProfile or a feedret.v1.Member message (the same field names), so
    the servers check the message as it arrived, before building anything from it. Counts
    are checked before the items they count; the whole check costs about what reading the
    fields once does, far less than tokenizing them.
    """
    total = 0

    def text(field: str, value: str, limit: int) -> None:
        nonlocal total
        if len(value) > limit:
            raise InvalidMember(f"{field} is {len(value)} characters, the limit is {limit}")
        total += len(value)

    def count(field: str, n: int, limit: int, what: str) -> None:
        if n > limit:
            raise InvalidMember(f"{field} has {n} {what}, the limit is {limit}")

    text("member.member_id", member.member_id, limits.max_id_chars)
    text("member.session_id", member.session_id, limits.max_id_chars)
    count("member.profile", len(member.profile), limits.max_profile_fields, "fields")
    for key, value in member.profile.items():
        text(f"member.profile name {_name(key)}", key, limits.max_name_chars)
        text(f"member.profile[{_name(key)}]", value, limits.max_profile_chars)
    count("member.features", len(member.features), limits.max_features, "features")
    for key, value in member.features.items():
        text(f"member.features name {_name(key)}", key, limits.max_name_chars)
        if not math.isfinite(value):  # the quantizer would bucket NaN as if it were a number
            raise InvalidMember(f"member.features[{_name(key)}] must be a finite number, got {value}")
    count("member.recent_activity", len(member.recent_activity), limits.max_activity_items, "items")
    for i, item in enumerate(member.recent_activity):
        text(f"member.recent_activity[{i}].text", item.text, limits.max_activity_chars)
        text(f"member.recent_activity[{i}].action", item.action, limits.max_name_chars)
        if not math.isfinite(item.timestamp):  # it orders the activity, newest first
            raise InvalidMember(f"member.recent_activity[{i}].timestamp must be a finite number, got {item.timestamp}")
    if total > limits.max_member_chars:
        raise InvalidMember(
            f"member has {total} characters in all (ids, profile, feature names, activity), "
            f"the limit is {limits.max_member_chars}"
        )



def _shown(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value: Any) -> str:
    """A value's type as JSON names it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


MEMBER_FIELDS = ("member_id", "session_id", "profile", "features", "recent_activity")
ACTIVITY_FIELDS = ("post_id", "text", "action", "timestamp")


def _check_json(obj: Any) -> None:
    """Every field's type, so that a mistake is an InvalidMember naming the field (a string
    where a list belongs ended in an AttributeError) and a misspelt field such as
    `recent_activities` is not silently dropped."""
    if not isinstance(obj, dict):
        raise InvalidMember(f"must be a JSON object, got {_json_type(obj)}")
    unknown = [k for k in obj if k not in MEMBER_FIELDS]
    if unknown:
        raise InvalidMember(f"unknown field {unknown[0]!r}; the fields are {', '.join(MEMBER_FIELDS)}")
    if obj.get("member_id") is None:
        raise InvalidMember("member_id is required (a non-empty string)")
    if not isinstance(obj["member_id"], str) or not obj["member_id"]:
        got = obj["member_id"]
        raise InvalidMember(f"member_id must be a non-empty string, got {_json_type(got)} {_shown(got)}")
    if not isinstance(obj.get("session_id", ""), str):
        raise InvalidMember(f"session_id must be a string, got {_json_type(obj['session_id'])}")
    # null is the same as absent; 0, "" or false where an object belongs are mistakes.
    profile = {} if obj.get("profile") is None else obj["profile"]
    if not isinstance(profile, dict):
        raise InvalidMember(f"profile must be an object of strings, got {_json_type(profile)}")
    for key, value in profile.items():
        if not isinstance(value, str):
            raise InvalidMember(f"profile.{key} must be a string, got {_json_type(value)}")
    features = {} if obj.get("features") is None else obj["features"]
    if not isinstance(features, dict):
        raise InvalidMember(f"features must be an object of numbers, got {_json_type(features)}")
    for key, value in features.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidMember(f"features.{key} must be a finite number, got {_json_type(value)} {_shown(value)}")
    activity = [] if obj.get("recent_activity") is None else obj["recent_activity"]
    if not isinstance(activity, list):
        raise InvalidMember(
            f"recent_activity must be an array of objects (most recent first), got {_json_type(activity)}")
    for i, item in enumerate(activity):
        where = f"recent_activity[{i}]"
        if not isinstance(item, dict):
            raise InvalidMember(f"{where} must be an object with {', '.join(ACTIVITY_FIELDS)}, got {_json_type(item)}")
        unknown = [k for k in item if k not in ACTIVITY_FIELDS]
        if unknown:
            raise InvalidMember(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(ACTIVITY_FIELDS)}")
        post_id = item.get("post_id", 0)
        if isinstance(post_id, bool) or not isinstance(post_id, int) or not 0 <= post_id <= MAX_POST_ID:
            raise InvalidMember(
                f"{where}.post_id must be an integer from 0 to 2^63-1, got {_json_type(post_id)} {_shown(post_id)}")
        for key in ("text", "action"):
            if not isinstance(item.get(key, ""), str):
                raise InvalidMember(f"{where}.{key} must be a string, got {_json_type(item[key])}")
        stamp = item.get("timestamp", 0.0)
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
            raise InvalidMember(
                f"{where}.timestamp must be Unix seconds (a number), got {_json_type(stamp)} {_shown(stamp)}")
