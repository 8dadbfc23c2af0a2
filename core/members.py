"""The member as the encoder sees it, independent of gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


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
