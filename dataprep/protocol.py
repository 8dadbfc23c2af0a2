"""From a dataset to what training and evaluation consume: a time split, features as of
the split, member states as of each moment, and (member state, engaged item) examples.

The protocol (docs/training.md): interactions before the cutoff train; those after
it evaluate. A query is one moment at which a member engaged (one member and one
timestamp: MovieLens submits ratings in bursts, and a burst is one moment); the
member's state is everything they did strictly before it; the positives are what
they liked at that moment. Training examples are built the same way from the
training period, so a model never sees an engagement's own future.
Pure: no model, no I/O.
"""

from __future__ import annotations

import dataclasses

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from feedret.dataprep.format import Interaction, Item, MemberInfo
from feedret.events import PostEvent
from feedret.members import ActivityItem, MemberProfile

COLD_START_MAX_PRIOR = 5


@dataclass(frozen=True)
class Split:
    train: list[Interaction]
    test: list[Interaction]
    cutoff: float


def time_split(interactions: Sequence[Interaction], test_fraction: float = 0.2) -> Split:
    """The last test_fraction of interactions (by time) evaluate; the rest train.

    The cutoff is a timestamp, so one moment never straddles the split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ordered = sorted(interactions, key=lambda i: (i.timestamp, i.member_id, i.item_id))
    cutoff = ordered[min(int(len(ordered) * (1 - test_fraction)), len(ordered) - 1)].timestamp
    train = [i for i in ordered if i.timestamp < cutoff]
    test = [i for i in ordered if i.timestamp >= cutoff]
    return Split(train=train, test=test, cutoff=cutoff)


def item_features(items: Mapping[int, Item], seen: Iterable[Interaction]) -> dict[int, dict[str, float]]:
    """Each item's own features plus engagement count and mean weight over `seen` only.

    Pass the training interactions: counts over the evaluation period would leak it.
    """
    count: dict[int, int] = defaultdict(int)
    total: dict[int, float] = defaultdict(float)
    for i in seen:
        count[i.item_id] += 1
        total[i.item_id] += i.weight
    out = {}
    for item_id, item in items.items():
        features = dict(item.features)
        features["engagements"] = float(count[item_id])
        if count[item_id]:
            features["mean_weight"] = round(total[item_id] / count[item_id], 2)
        out[item_id] = features
    return out


ENGAGEMENT_FEATURES = ("engagements", "mean_weight")  # what item_features adds


class EngagementsAsOf:
    """Each item's engagement features as they stood at any moment: item_features over only
    the interactions strictly before it.

    item_features over the whole training period gives a training example's positive the
    count that includes that very engagement and everything after it: the prompt tells the
    model which posts will be engaged with. As of the example's moment, the post shows what
    a member could have seen then, as a fresh post does at serving time.
    """

    def __init__(self, items: Mapping[int, Item], seen: Iterable[Interaction]) -> None:
        by_item: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for i in seen:
            by_item[i.item_id].append((i.timestamp, i.weight))
        self._items = items
        self._times: dict[int, np.ndarray] = {}
        self._weight_sums: dict[int, np.ndarray] = {}
        for item_id, rows in by_item.items():
            rows.sort()
            self._times[item_id] = np.array([t for t, _ in rows], dtype=np.float64)
            self._weight_sums[item_id] = np.cumsum([w for _, w in rows], dtype=np.float64)

    def features(self, item_id: int, at: float) -> dict[str, float]:
        """item_features' form for one item, counting only interactions before `at`."""
        features = dict(self._items[item_id].features)
        times = self._times.get(item_id)
        n = 0 if times is None else int(np.searchsorted(times, at, side="left"))
        features["engagements"] = float(n)
        if n:
            features["mean_weight"] = round(float(self._weight_sums[item_id][n - 1]) / n, 2)
        return features


def as_unengaged(post: PostEvent) -> PostEvent:
    """The post as it is the moment it is published: no engagement yet (item_features' form for it)."""
    features = {k: v for k, v in post.features.items() if k not in ENGAGEMENT_FEATURES}
    features["engagements"] = 0.0
    return dataclasses.replace(post, features=features)


def post_events(items: Mapping[int, Item], features: Mapping[int, Mapping[str, float]]) -> dict[int, PostEvent]:
    return {
        item_id: PostEvent(
            post_id=item_id,
            op="upsert",
            author_id=item.author_id,
            text=item.text,
            created_at=item.created_at,
            lang=item.lang,
            features=dict(features.get(item_id, item.features)),
        )
        for item_id, item in items.items()
    }


def _action(interaction: Interaction) -> str:
    """The engagement as the prompt says it: the data's own word when it has one (a click, a save,
    a to-read list are not ratings), else the weight."""
    return interaction.action or f"rated {interaction.weight:g}"


def member_state(
    member_id: str,
    history: Sequence[Interaction],
    items: Mapping[int, Item],
    info: MemberInfo | None = None,
    max_recent: int = 10,
    like_threshold: float = 0.0,
    session_id: str = "",
) -> MemberProfile:
    """The member as of the end of `history` (oldest first): their recent liked items and counts."""
    liked = [h for h in history if h.weight >= like_threshold]
    recent = liked[-max_recent:][::-1]
    features = dict(info.features) if info else {}
    features["prior_engagements"] = float(len(history))
    return MemberProfile(
        member_id=member_id,
        session_id=session_id,
        profile=dict(info.profile) if info else {},
        features=features,
        recent_activity=tuple(
            ActivityItem(h.item_id, items[h.item_id].text, _action(h), h.timestamp) for h in recent
        ),
    )


@dataclass(frozen=True)
class Moment:
    """One member engaging at one time: the state before it and what they liked then."""

    member_id: str
    timestamp: float
    history: tuple[Interaction, ...]  # strictly before timestamp, oldest first
    positives: tuple[int, ...]  # liked at timestamp, not seen before

    @property
    def prior(self) -> int:
        return len(self.history)

    @property
    def cold_start(self) -> bool:
        return self.prior <= COLD_START_MAX_PRIOR


def moments(
    interactions: Sequence[Interaction],
    *,
    since: float = float("-inf"),
    like_threshold: float = 0.0,
) -> list[Moment]:
    """Every (member, timestamp) at or after `since` with at least one liked, unseen item.

    `interactions` must include the history before `since` (the whole log), so
    members' states are complete.
    """
    by_member: dict[str, list[Interaction]] = defaultdict(list)
    for i in interactions:
        by_member[i.member_id].append(i)
    out = []
    for member_id in sorted(by_member):
        log = sorted(by_member[member_id], key=lambda i: (i.timestamp, i.item_id))
        seen: set[int] = set()
        start = 0
        while start < len(log):
            end = start
            while end < len(log) and log[end].timestamp == log[start].timestamp:
                end += 1
            t = log[start].timestamp
            if t >= since:
                positives = tuple(
                    sorted({i.item_id for i in log[start:end] if i.weight >= like_threshold} - seen)
                )
                if positives:
                    out.append(Moment(member_id, t, tuple(log[:start]), positives))
            seen.update(i.item_id for i in log[start:end])
            start = end
    return out


def sample(xs: Sequence, n: int | None, seed: int) -> list:
    """A deterministic sample of at most n, in the original order."""
    if n is None or len(xs) <= n:
        return list(xs)
    keep = sorted(random.Random(seed).sample(range(len(xs)), n))
    return [xs[i] for i in keep]


@dataclass(frozen=True)
class Example:
    """One training pair: a member state and one item they engaged with next."""

    member: MemberProfile
    positive: int
    seen: frozenset[int]  # never use these as negatives for this member
    timestamp: float = 0.0  # the moment of the engagement


def training_examples(
    train: Sequence[Interaction],
    items: Mapping[int, Item],
    members: Mapping[str, MemberInfo],
    *,
    like_threshold: float,
    max_recent: int,
    max_per_member: int | None,
    seed: int,
) -> list[Example]:
    """One example per liked item per training moment, at most max_per_member per member."""
    by_member: dict[str, list[Example]] = defaultdict(list)
    for m in moments(train, like_threshold=like_threshold):
        state = member_state(m.member_id, m.history, items, members.get(m.member_id), max_recent, like_threshold)
        seen = frozenset(h.item_id for h in m.history) | frozenset(m.positives)
        for pos in m.positives:
            by_member[m.member_id].append(Example(state, pos, seen, m.timestamp))
    out: list[Example] = []
    for i, member_id in enumerate(sorted(by_member)):
        out.extend(sample(by_member[member_id], max_per_member, seed + i))
    return out


def popularity(train: Iterable[Interaction], like_threshold: float = 0.0) -> dict[int, float]:
    """Liked-engagement counts per item over the training period: the popularity baseline's scores."""
    counts: dict[int, float] = defaultdict(float)
    for i in train:
        if i.weight >= like_threshold:
            counts[i.item_id] += 1.0
    return dict(counts)


def candidate_mask(item_ids: np.ndarray, created_at: np.ndarray, moment: Moment) -> np.ndarray:
    """Items that existed at the moment and the member had not seen: what may be recommended."""
    seen = np.fromiter((h.item_id for h in moment.history), dtype=np.int64)
    return (created_at <= moment.timestamp) & ~np.isin(item_ids, seen)
