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

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feedret.shard_targets import parse_member_targets, parse_shard_targets


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


class FleetSpec(BaseModel):
    """One generation's shards, as the root calls them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")  # the `fleet` metric label
    shard_addresses: str  # FEEDRET_SHARD_ADDRESSES syntax

    @field_validator("shard_addresses")
    @classmethod
    def _shards(cls, value: str) -> str:
        parse_shard_targets(value)  # a malformed list is refused, naming the bad entry
        return value.strip()


class Topology(BaseModel):
    """What the root serves from: the member service that embeds members, and the fleets
    (the first serves queries that name no model, Lookup and Stats; the others answer
    queries whose vector is of their model).

    Written to FEEDRET_GENERATIONS_FILE, it is what a rollout changes: start adds the
    next fleet, promote puts it first and names its member service, retire drops the old
    fleet. The root re-reads the file when it changes, so every root switches at once
    without a restart (a Kubernetes ConfigMap mounted as a file works the same way).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    member_address: str = ""  # "": no member service (vector queries only)
    fleets: list[FleetSpec] = Field(min_length=1)

    @field_validator("member_address")
    @classmethod
    def _member(cls, value: str) -> str:
        if value.strip():
            parse_member_targets(value)
        return value.strip()

    @model_validator(mode="after")
    def _distinct(self) -> "Topology":
        names = [f.name for f in self.fleets]
        if len(set(names)) != len(names):
            raise ValueError(f"fleet names must differ, got {names}")
        return self


def read_topology(path: Path) -> Topology:
    """The topology a generations file holds; ValueError saying what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Topology.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise ValueError(f"{path}: {where}: {first['msg']}") from None


def write_topology(path: Path, topology: Topology) -> None:
    """Replace the file in one rename, so a root never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(topology.model_dump_json(indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
