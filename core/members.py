"""The member as the encoder sees it, independent of gRPC."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

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
        """From the JSON a user types on the command line (same field names as the proto)."""
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
