"""The root's view of the member embedding service: every pod, and which one a member goes to.

A single gRPC channel to a Kubernetes Service holds one HTTP/2 connection, so
every Embed from a root pod would reach one member pod whatever the autoscaler
adds, and round robin over pods would scatter a session's pages over pods whose
caches do not have it. Instead the root keeps a channel per member pod and sends
each member to its rendezvous home (`feedret.affinity`), failing over to the
next pod in the member's order when the home is unreachable.

FEEDRET_MEMBER_ADDRESS forms:
    (empty)                            no member service: vector queries only
    host:port                          one member service (or a Service's virtual IP)
    host:port|host:port                a fixed list of pods
    dns:///name:port                   every address the name resolves to, re-resolved
                                       every `resolve_interval_s` (a headless Service
                                       lists its ready pods)
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Sequence

import grpc
import structlog

from feedret.affinity import rendezvous_order
from feedret.shard_targets import host_port, is_pool, parse_member_targets
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

Resolver = Callable[[str, int], list[str]]

# Worth trying the member's next pod: the home is down, restarting or overloaded.
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every TCP address `host` resolves to, as sorted host:port strings (IPv6 in brackets)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, sockaddr in infos:
        addr = sockaddr[0]
        out.add(f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}")
    return sorted(out)


class MemberPool:
    def __init__(
        self,
        address: str,
        channel_options: Sequence[tuple[str, object]] = (),
        resolve_interval_s: float = 5.0,
        resolver: Resolver = resolve_addresses,
        open_channel: Callable[[str, list], grpc.Channel] | None = None,
    ) -> None:
        self.address = address
        # (target, options) -> channel; plaintext unless the root gives a TLS one.
        self._open_channel = open_channel or (lambda target, options: grpc.insecure_channel(target, options=options))
        targets = parse_member_targets(address)
        self._pool = targets[0] if targets and is_pool(targets[0]) else None
        self._options = list(channel_options)
        self._resolver = resolver
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.MemberEmbeddingServiceStub]] = {}
        self._replicas: list[str] = [] if self._pool else targets
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._pool:
            self.refresh()
            self._thread = threading.Thread(
                target=self._refresh_loop, args=(resolve_interval_s,), name="member-resolve", daemon=True
            )
            self._thread.start()

    # --------------------------------------------------------------- discovery

    def replicas(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def refresh(self) -> None:
        """Re-resolve a dns: pool. A failed or empty answer keeps the last known pods."""
        if not self._pool:
            return
        host, port = host_port(self._pool)
        try:
            found = self._resolver(host, port)
        except OSError as exc:
            log.warning("member_resolve_failed", target=self._pool, error=str(exc), kept=len(self._replicas))
            return
        if not found:
            log.warning("member_resolve_empty", target=self._pool, kept=len(self._replicas))
            return
        with self._lock:
            if found == self._replicas:
                return
            gone = [a for a in self._stubs if a not in found]
            closing = [self._stubs.pop(a)[0] for a in gone]
            before, self._replicas = self._replicas, list(found)
        for channel in closing:
            channel.close()
        log.info("member_pods_changed", target=self._pool, pods=found, added=sorted(set(found) - set(before)),
                 removed=sorted(set(before) - set(found)))

    def _refresh_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.refresh()

    def _stub(self, address: str) -> pb_grpc.MemberEmbeddingServiceStub:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = self._open_channel(address, self._options)
                entry = self._stubs[address] = (channel, pb_grpc.MemberEmbeddingServiceStub(channel))
            return entry[1]

    # ----------------------------------------------------------------- calls

    def embed(self, request: pb.EmbedRequest, deadline: float, max_attempts: int = 2) -> pb.EmbedResponse:
        """Embed on the member's home pod; on UNAVAILABLE, on the next pod in its order.

        Raises the last grpc.RpcError when every attempt failed (or at once for a code
        no other pod would answer differently, such as INVALID_ARGUMENT), NoMemberPods
        when no pod is known, DeadlineBeforeCall when the deadline ran out first.
        """
        if not self.address.strip():
            raise NoMemberService("no member service is configured (FEEDRET_MEMBER_ADDRESS is empty): query with a vector")
        order = rendezvous_order(request.member.member_id, self.replicas())
        if not order:
            raise NoMemberPods(f"no member service pod resolved from {self.address}")
        error: grpc.RpcError | None = None
        for address in order[:max_attempts]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return self._stub(address).Embed(request, timeout=remaining)
            except grpc.RpcError as exc:
                error = exc
                if exc.code() not in _FAILOVER_CODES:
                    raise
                log.warning("member_pod_failed", pod=address, code=exc.code().name, details=exc.details())
        if error is None:
            raise DeadlineBeforeCall("the deadline passed before the member service was called")
        raise error

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            channels = [c for c, _ in self._stubs.values()]
            self._stubs.clear()
        for channel in channels:
            channel.close()


class NoMemberService(Exception):
    """The root runs without a member service: only vector queries can be answered."""


class NoMemberPods(Exception):
    """No address is known for the member service (a dns: pool that never resolved)."""


class DeadlineBeforeCall(Exception):
    """The caller's deadline ran out before any member pod could be asked."""
