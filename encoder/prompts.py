"""Text prompts for the dual encoder: one for a post, one for a member.

Both towers share one causal LM, so both sides are rendered as plain text in
the same line-oriented layout. Short structured fields come first and free text
last, so that truncation to the model's max_length drops the tail of the text
(or the oldest activity), never the features. Pure and deterministic: the same
input always gives the same prompt, byte for byte.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Literal, Mapping

from feedret.encoder.quantize import FeatureQuantizer
from feedret.events import PostEvent
from feedret.members import ActivityItem, MemberProfile

NumericMode = Literal["quantized", "raw", "none"]
NUMERIC_MODES: tuple[str, ...] = ("quantized", "raw", "none")

NUM_OPEN = "<num>"
NUM_CLOSE = "</num>"
# The tokenizer's special tokens; user text must not be able to forge them.
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", NUM_OPEN, NUM_CLOSE)
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """One line of text: special-token strings removed, whitespace runs collapsed."""
    return _SPACE.sub(" ", _SPECIAL.sub(" ", text)).strip()


def format_raw(value: float) -> str:
    # Whole numbers without ".0"; others to 6 significant digits, as a person writes them.
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def format_feature(
    name: str, value: float, quantizer: FeatureQuantizer | None, numeric: str
) -> str | None:
    """The rendered value of one feature, or None when it is left out of the prompt.

    In quantized mode a feature the quantizer was not fitted on (or any feature
    when there is no quantizer) is left out: a raw number beside buckets would
    mean something different in the same position.
    """
    if numeric == "raw":
        return format_raw(value) if math.isfinite(value) else None
    if numeric == "quantized":
        bucket = quantizer.bucket(name, value) if quantizer is not None else None
        return None if bucket is None else f"{NUM_OPEN}{bucket}{NUM_CLOSE}"
    return None


def _check_mode(numeric: str) -> None:
    if numeric not in NUMERIC_MODES:
        raise ValueError(f"numeric must be one of {list(NUMERIC_MODES)}, got {numeric!r}")


def _feature_lines(
    features: Mapping[str, float], quantizer: FeatureQuantizer | None, numeric: str
) -> Iterable[str]:
    for name in sorted(features):
        rendered = format_feature(name, float(features[name]), quantizer, numeric)
        if rendered is not None:
            yield f"{clean_text(name)}: {rendered}"


def post_prompt(
    post: PostEvent, quantizer: FeatureQuantizer | None, numeric: str = "quantized"
) -> str:
    """The prompt the encoder embeds for one post (an upsert event)."""
    _check_mode(numeric)
    if post.op != "upsert":
        raise ValueError(f"post {post.post_id}: only upsert events have a prompt, got {post.op!r}")
    lines = ["post"]
    if post.author_id:
        lines.append(f"author: {clean_text(post.author_id)}")
    if post.lang:
        lines.append(f"language: {clean_text(post.lang)}")
    lines.extend(_feature_lines(post.features, quantizer, numeric))
    lines.append(f"text: {clean_text(post.text)}")
    return "\n".join(lines)


def shorten(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary; 0 means no limit."""
    if limit <= 0 or len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def recent_first(activity: Iterable[ActivityItem], limit: int) -> list[ActivityItem]:
    """At most `limit` items, newest first.

    MemberProfile promises newest first, but clients build it by hand; a
    stable sort on the timestamp keeps the given order for equal (or absent, 0)
    timestamps and fixes it otherwise.
    """
    if limit < 0:
        raise ValueError(f"max_activity must be >= 0, got {limit}")
    return sorted(activity, key=lambda a: -a.timestamp)[:limit]


def member_prompt(
    member: MemberProfile,
    quantizer: FeatureQuantizer | None,
    numeric: str = "quantized",
    max_activity: int = 10,
    activity_chars: int = 0,
) -> str:
    """The prompt the encoder embeds for one member: its numbers, its profile fields as a
    section of their own, then its recent activity, newest first.

    activity_chars > 0 cuts each engaged post's text to that many characters
    (at a word boundary): the opening of a post says what it is, and the whole
    history then fits the model's context instead of the first few posts.
    """
    _check_mode(numeric)
    lines = ["member"]
    lines.extend(_feature_lines(member.features, quantizer, numeric))
    if member.profile:
        # A section of its own, after the numbers (a profile value may be long text): a profile
        # field and a feature of one name ("age: 34", "age: <num>3</num>") stay two things.
        lines.append("profile:")
        for key in sorted(member.profile):
            lines.append(f"- {clean_text(key)}: {clean_text(str(member.profile[key]))}")
    items = recent_first(member.recent_activity, max_activity)
    if items:
        lines.append("recent activity:")
        for item in items:
            action = clean_text(item.action) or "engaged"
            lines.append(f"- {action}: {shorten(clean_text(item.text), activity_chars)}")
    return "\n".join(lines)
