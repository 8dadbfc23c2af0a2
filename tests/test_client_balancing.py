"""Callers spread over root pods: FeedretClient round-robins over a pool address; roots recycle connections."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedret.clients.client import AsyncFeedretClient, FeedretClient, channel_options
from feedret.config import RootConfig
from feedret.server import root as root_server
from feedret.server.grpc_common import build_server
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port


class CountingAdmin(pb_grpc.IndexAdminServicer):
    def __init__(self) -> None:
        self.calls = 0

    def Stats(self, request, context):
        self.calls += 1
        return pb.StatsResponse(total_indexed=1)


@pytest.fixture
def two_roots():
    admins, servers, ports = [], [], []
    for _ in range(2):
        admin = CountingAdmin()
        server, _, port = build_server("127.0.0.1", 0, 2, [lambda s, a=admin: pb_grpc.add_IndexAdminServicer_to_server(a, s)],
                                       ["feedret.v1.IndexAdmin"])
        server.start()
        admins.append(admin), servers.append(server), ports.append(port)
    yield admins, ports
    for server in servers:
        server.stop(0)


def test_a_static_pool_address_spreads_calls_over_every_root(two_roots):
    admins, ports = two_roots
    with FeedretClient(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}") as client:
        for _ in range(20):
            client.stats(timeout=5)
    # round_robin: every pod gets its share (the first calls go to whichever connected first).
    assert sum(a.calls for a in admins) == 20 and all(a.calls >= 7 for a in admins), [a.calls for a in admins]


def test_the_async_client_spreads_too(two_roots):
    admins, ports = two_roots

    async def main():
        client = AsyncFeedretClient(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
        for _ in range(20):
            await client.stats(timeout=5)
        await client.close()

    asyncio.run(main())
    # round_robin: every pod gets its share (the first calls go to whichever connected first).
    assert sum(a.calls for a in admins) == 20 and all(a.calls >= 7 for a in admins), [a.calls for a in admins]


def test_a_plain_address_keeps_one_connection(two_roots):
    admins, ports = two_roots
    with FeedretClient(f"127.0.0.1:{ports[0]}") as client:
        for _ in range(5):
            client.stats(timeout=5)
    assert [a.calls for a in admins] == [5, 0]


def test_only_pool_addresses_get_round_robin():
    assert any("round_robin" in str(v) for _, v in channel_options("dns:///feedret-root-pods.feedret:50051"))
    assert not any("round_robin" in str(v) for _, v in channel_options("feedret-root.feedret:50051"))


def test_a_root_ends_its_callers_connections_after_the_max_age():
    # The real root server (serve), so a caller behind the Service's virtual IP moves to
    # other root pods over time instead of staying on the first one forever.
    port = free_port()
    config = RootConfig(port=port, metrics_port=0, max_connection_age_s=0.3, shard_addresses="127.0.0.1:1")
    stop = threading.Event()
    thread = threading.Thread(target=root_server.serve, args=(config, stop), daemon=True)
    thread.start()
    seen: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
            channel.subscribe(seen.append)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and grpc.ChannelConnectivity.IDLE not in seen:
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert grpc.ChannelConnectivity.IDLE in seen, seen
