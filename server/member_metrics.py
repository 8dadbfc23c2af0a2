"""The member service's Prometheus metrics (`feedret_member_*`): session-cache outcomes and size,
and the encoder's forward passes (time and members per pass).

Registered when imported, that is by `feedret.server.member`; exported by the member service's
endpoint (`feedret.metrics.start_metrics_server`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from feedret.metrics import LATENCY_BUCKETS

MEMBER_CACHE = Counter(
    "feedret_member_cache_lookups_total",
    "Embed requests by cache outcome: hit, miss (embedded, then cached), no_session (no session id: never cached).",
    ["result"],
)
for _result in ("hit", "miss", "no_session"):
    MEMBER_CACHE.labels(result=_result)


def observe_member_cache(*, hit: bool, cacheable: bool) -> None:
    MEMBER_CACHE.labels(result="hit" if hit else "miss" if cacheable else "no_session").inc()


MEMBER_EMBED_SECONDS = Histogram(
    "feedret_member_embed_seconds",
    "One forward pass of the member encoder, for a batch of one or more members (excluding the wait for the model).",
    buckets=LATENCY_BUCKETS,
)
MEMBER_EMBED_BATCH = Histogram(
    "feedret_member_embed_batch_members",
    "Members embedded together in one forward pass: cache misses that queued behind the previous pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MEMBER_CACHE_ENTRIES = Gauge("feedret_member_cache_entries", "Member vectors in the session cache.")
