"""Which replica serves a key: rendezvous (highest-random-weight) hashing. Pure.

The root sends every request of a member to the same member-service pod, so the
pod's per-session cache is hit on the second page of a feed instead of once in N
pods. Rendezvous hashing gives each key a preference order over the replicas:
the first is its home, the next ones are where it fails over to. When a pod is
added or removed only the keys whose home it is (or becomes) move, about 1/N of
them; every other member keeps its warm cache.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def _weight(key: bytes, replica: str) -> int:
    # blake2b is in the standard library, fast on short inputs, and stable across
    # processes and versions (Python's hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(key + b"\x00" + replica.encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """`replicas` ordered by preference for `key`: the home first, then the failovers.

    Deterministic for a given key and set of replicas, whatever their order;
    duplicates count once.
    """
    k = key.encode()
    unique = sorted(set(replicas))
    return sorted(unique, key=lambda r: (_weight(k, r), r), reverse=True)
