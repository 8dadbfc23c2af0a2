"""Which shard fleet answers a query, when a model rollout runs two side by side.

A generation is one model's vectors in a fleet of shards of their own (their own
`post-vectors` topic, any shard count). During a rollout the root holds the serving
fleet and the next one (FEEDRET_NEXT_SHARD_ADDRESSES), and the member service moves
from the old model to the new pod by pod: each query then carries its vector's model
(the member service's answer, or `QueryVector.model_version`), and goes to the fleet
that serves that model, so no query is scored against another model's posts and none
goes unanswered while both models are live. Policy only, no gRPC: the root learns each
fleet's model from its shards' answers and asks here where to send a query.
"""

from __future__ import annotations


def fleets_to_ask(query_model: str, fleet_models: list[str]) -> list[int]:
    """Indices of the fleets to try, in order, for a query whose vector is of `query_model`.

    Fleets known to serve it first, then fleets whose model is not known yet (the root
    learns it from their first answer); never a fleet known to serve another model. A
    query that names no model goes to the serving fleet (0), whatever it serves. Empty:
    no fleet can answer it (FAILED_PRECONDITION).
    """
    if not query_model:
        return [0]
    known = [i for i, model in enumerate(fleet_models) if model == query_model]
    unknown = [i for i, model in enumerate(fleet_models) if not model]
    return known + unknown
