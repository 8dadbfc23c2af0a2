"""Is the next generation ready to take the serving one's place? (`feedret rollout status`)

During a model rollout (README, "A new model without a gap") the next generation embeds
`posts` with its own consumer group into its own vectors topic, read by its own shards.
It may be promoted once it holds every live post, which is checked, not assumed:

- its consumer group has committed every `posts` partition to the end (nothing left to embed);
- every one of its shards answers, serves one model (the same on all), and has applied its
  partition up to the end offset it last fetched;
- it indexes at least as many posts as the serving generation (both read the same `posts`).

Pure: the CLI gathers the facts (the root's Stats for the serving fleet, each next shard's
own Stats, the group's offsets from Kafka) and this decides, saying why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from feedret.v1 import feedret_pb2 as pb


@dataclass(frozen=True)
class FleetView:
    """One generation's shards as their Stats describe them."""

    models: tuple[str, ...]  # distinct model versions its reachable shards serve
    shards: int
    reachable: int
    ready: int  # shards that have caught up with their partition once (SERVING)
    indexed: int
    behind: int  # records its shards have not applied yet, by their own end offsets
    rejected: int

    @property
    def model(self) -> str:
        return self.models[0] if len(self.models) == 1 else ""


@dataclass(frozen=True)
class Readiness:
    serving: FleetView
    next: FleetView
    to_embed: int | None  # `posts` events the next consumer group has not committed; None: unknown
    reasons: tuple[str, ...] = field(default=())  # why it is not ready; empty when it is

    @property
    def ready(self) -> bool:
        return not self.reasons


def fleet_view(shards: Sequence[pb.ShardStats]) -> FleetView:
    up = [s for s in shards if s.reachable]
    return FleetView(
        models=tuple(sorted({s.model_version for s in up if s.model_version})),
        shards=len(shards),
        reachable=len(up),
        ready=sum(1 for s in up if s.ready),
        indexed=sum(s.indexed for s in up),
        behind=sum(max(s.end_offset - s.applied[0].offset, 0) for s in up if s.applied),
        rejected=sum(s.rejected for s in up),
    )


def posts_left(committed: Mapping[int, int], ends: Mapping[int, int]) -> int:
    """`posts` events past the group's committed offsets, over every partition (none committed: all)."""
    return sum(max(end - committed.get(partition, 0), 0) for partition, end in ends.items())


def readiness(serving: Sequence[pb.ShardStats], next_shards: Sequence[pb.ShardStats],
              committed: Mapping[int, int] | None, ends: Mapping[int, int] | None) -> Readiness:
    """Whether the next fleet may be promoted, and if not, every reason why."""
    s, n = fleet_view(serving), fleet_view(next_shards)
    to_embed = posts_left(committed, ends) if committed is not None and ends is not None else None
    reasons = []
    if n.reachable < n.shards:
        reasons.append(f"{n.shards - n.reachable} of its {n.shards} shards do not answer")
    if len(n.models) != 1:
        reasons.append(f"its shards serve {len(n.models)} models ({', '.join(n.models) or 'none yet'}), not one")
    if to_embed is None:
        reasons.append("its consumer group has committed no offsets yet (still loading its model, or Kafka is unreachable)")
    elif to_embed:
        reasons.append(f"its consumer has {to_embed} posts events left to embed")
    if n.ready < n.reachable:
        reasons.append(f"{n.reachable - n.ready} of its shards are still replaying their partitions")
    if n.behind:
        reasons.append(f"its shards have {n.behind} vector records left to apply")
    if n.indexed < s.indexed:
        reasons.append(f"it indexes {n.indexed} posts, the serving generation {s.indexed}")
    return Readiness(serving=s, next=n, to_embed=to_embed, reasons=tuple(reasons))
