"""The root's shard address list (shards separated by `,`, a shard's replicas by `|`) and member address.

    FEEDRET_SHARD_ADDRESSES=10.0.0.1:50061|10.0.0.2:50061,10.0.0.3:50061|10.0.0.4:50061
    FEEDRET_SHARD_ADDRESSES=dns:///feedret-shard-0:50061,dns:///feedret-shard-1:50061

Each replica is a gRPC target. `host:port` is one replica. A `dns:` target is a
pool: every address its name resolves to (a Kubernetes headless Service lists
a shard's ready pods) is a replica, and the channel spreads calls over them
with gRPC's round_robin policy. Pure parsing; errors name the bad entry.
"""

from __future__ import annotations

import json
import re

# gRPC target schemes other than dns: a shard's replicas must be dns names or host:port.
_OTHER_SCHEMES = {"unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p"}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+)$")


# gRPC service config that spreads a channel's calls over every address its target resolves to.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def is_pool(target: str) -> bool:
    """True for a target whose resolved addresses are the replicas (a `dns:` target)."""
    return target.startswith("dns:")


def host_port(target: str) -> tuple[str, int]:
    """The name and port a target points at: `dns://[authority]/host:port` or `host:port`.

    ValueError, saying what is wrong, for anything else.
    """
    rest = target
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"{target!r}: a dns target is dns:///host:port (or dns://resolver/host:port)")
    elif "://" in target or target.split(":", 1)[0] in _OTHER_SCHEMES:
        scheme = target.split(":", 1)[0]
        raise ValueError(f"{target!r}: scheme {scheme!r} is not supported; use host:port or dns:///host:port")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{target!r} has no port: write host:port")
    if not _HOST.match(host):
        raise ValueError(f"{target!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{target!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def parse_shard_targets(text: str) -> list[list[str]]:
    """One list of replica targets per shard, in shard order. ValueError on a malformed list.

    Spaces around entries are ignored; an empty shard or replica (`a,,b`, `a||b`),
    a target without a port, an unsupported scheme, or a target listed twice is an error.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("names no shard: expected host:port[|host:port...] per shard, separated by commas")
    shards: list[list[str]] = []
    seen: dict[str, int] = {}
    for shard, spec in enumerate(stripped.split(",")):
        if not spec.strip():
            raise ValueError(f"shard {shard} is empty in {text!r} (two commas in a row, or a trailing comma?)")
        replicas = []
        for target in (t.strip() for t in spec.split("|")):
            if not target:
                raise ValueError(f"shard {shard} has an empty replica in {spec.strip()!r}")
            try:
                host_port(target)
            except ValueError as exc:
                raise ValueError(f"shard {shard}: {exc}") from None
            if target in seen:
                where = "twice" if seen[target] == shard else f"for shards {seen[target]} and {shard}"
                raise ValueError(f"{target!r} is listed {where}: each replica serves one shard")
            seen[target] = shard
            replicas.append(target)
        shards.append(replicas)
    return shards


def parse_member_targets(text: str) -> list[str]:
    """The `|`-separated targets of FEEDRET_MEMBER_ADDRESS. ValueError naming the bad entry.

    Empty: no member service (the root answers member queries with FAILED_PRECONDITION).
    """
    if not text.strip():
        return []
    targets = [t.strip() for t in text.strip().split("|")]
    if not targets or any(not t for t in targets):
        raise ValueError(f"{text!r}: expected host:port, host:port|host:port... or dns:///name:port")
    for target in targets:
        host_port(target)  # raises, naming the target
    if len(set(targets)) != len(targets):
        raise ValueError(f"{text!r} lists a target twice")
    if len(targets) > 1 and any(is_pool(t) for t in targets):
        raise ValueError(f"{text!r}: a dns: pool is the whole list; do not mix it with other targets")
    return targets
