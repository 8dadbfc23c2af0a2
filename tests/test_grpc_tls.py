"""gRPC over TLS: servers that refuse plaintext and unknown callers, a plaintext health port
for the kubelet, and the root calling its shards with TLS, all with certificates made here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from feedret.clients.client import FeedretClient
from feedret.config import GrpcTlsConfig, KafkaConfig, RootConfig, ShardConfig
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server, set_serving
from feedret.server.grpc_tls import channel_credentials
from feedret.server.shard import ShardServicer, ShardState
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import SAMPLE_POSTS, free_port_block, make_certificates

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")

DIM = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ours = make_certificates(d, "feedret")
    other = make_certificates(d, "other")  # a CA the servers do not trust
    return {**ours, "other_ca": other["ca"], "other_cert": other["cert"], "other_key": other["key"]}


def tls_config(pki, **extra) -> GrpcTlsConfig:
    return GrpcTlsConfig(tls_cert_file=pki["cert"], tls_key_file=pki["key"], tls_ca_file=pki["ca"], **extra)


def shard_state(shard: int) -> ShardState:
    state = ShardState(config=ShardConfig(shard_id=shard, num_shards=2), topic="post-vectors")
    rng = np.random.default_rng(shard)
    vecs = rng.normal(size=(50, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    state.apply([(i, pb.PostVectorEvent(post_id=100 * shard + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                        created_at=1e9, lang="en", model_version="m1")) for i, v in enumerate(vecs)],
                now=2e9)
    return state


def start_shard(shard: int, tls: GrpcTlsConfig):
    servicer = ShardServicer(shard_state(shard), "in-process")
    server, health, port = build_server(
        "127.0.0.1", 0, 4,
        [lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s),
         lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s)],
        shard_server.SERVICE_NAMES, tls=tls,
    )
    server.start()
    set_serving(health, shard_server.SERVICE_NAMES, True)
    return server, f"127.0.0.1:{port}"


def lookup(channel: grpc.Channel, post_id: int = 1) -> pb.LookupResponse:
    return pb_grpc.IndexAdminStub(channel).Lookup(pb.LookupRequest(post_id=post_id), timeout=5)


def test_settings_that_cannot_work_fail_at_start(pki, tmp_path):
    with pytest.raises(ValidationError, match="needs both"):
        GrpcTlsConfig(tls_cert_file=pki["cert"])
    with pytest.raises(ValidationError, match="does not exist"):
        GrpcTlsConfig(tls_cert_file=pki["cert"], tls_key_file=tmp_path / "missing.key")
    with pytest.raises(ValidationError, match="FEEDRET_HEALTH_PORT is for TLS servers"):
        GrpcTlsConfig(health_port=8081)
    assert not GrpcTlsConfig().enabled


def test_a_tls_server_answers_only_callers_with_a_certificate_its_ca_signed(pki):
    server, address = start_shard(0, tls_config(pki))
    try:
        good = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["key"].read_bytes(), pki["cert"].read_bytes())
        with grpc.secure_channel(address, good) as channel:
            assert lookup(channel).found

        refused = {
            "plaintext": grpc.insecure_channel(address),
            "TLS without a client certificate": grpc.secure_channel(address, grpc.ssl_channel_credentials(pki["ca"].read_bytes())),
            "a certificate from another CA": grpc.secure_channel(address, grpc.ssl_channel_credentials(
                pki["ca"].read_bytes(), pki["other_key"].read_bytes(), pki["other_cert"].read_bytes())),
            "a server it does not trust (the client trusts another CA)": grpc.secure_channel(address, grpc.ssl_channel_credentials(
                pki["other_ca"].read_bytes(), pki["key"].read_bytes(), pki["cert"].read_bytes())),
        }
        for why, channel in refused.items():
            with channel, pytest.raises(grpc.RpcError) as err:
                lookup(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, why
    finally:
        server.stop(0)


def test_without_client_auth_any_tls_caller_is_served(pki):
    server, address = start_shard(0, tls_config(pki, tls_client_auth=False))
    try:
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(pki["ca"].read_bytes())) as channel:
            assert lookup(channel).found
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            lookup(channel)
    finally:
        server.stop(0)


def test_the_health_port_serves_health_in_plaintext_and_nothing_else(pki):
    health_port = free_port_block(1)
    server, _ = start_shard(0, tls_config(pki, health_port=health_port))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ["", *shard_server.SERVICE_NAMES]:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.RpcError) as err:
                lookup(channel)  # the index is not reachable without TLS
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)


def test_the_root_calls_its_shards_with_tls_and_a_client_reaches_it_by_its_certificate_name(pki):
    tls = tls_config(pki, tls_server_name="feedret.internal")
    shards = [start_shard(i, tls) for i in range(2)]
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=",".join(a for _, a in shards), member_address=""), KafkaConfig(), tls
    )
    root, _, port = build_server("127.0.0.1", 0, 4, [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                 root_server.SERVICE_NAMES, tls=tls)
    root.start()
    try:
        # "localhost" rather than 127.0.0.1, checked against the name the certificate carries.
        with FeedretClient(f"localhost:{port}", credentials=channel_credentials(tls), server_name="feedret.internal") as client:
            result = client.retrieve(vector=[0.3] * DIM, k=100)
        assert not result.partial and len(result.post_ids) == 100
        assert {int(i) // 100 for i in result.post_ids} == {0, 1}  # both shards answered, over TLS
        with FeedretClient(f"127.0.0.1:{port}") as plaintext, pytest.raises(grpc.RpcError):
            plaintext.retrieve(vector=[0.3] * DIM, k=10)
    finally:
        root.stop(0)
        for server, _ in shards:
            server.stop(0)


@pytest.mark.e2e
def test_feedret_up_runs_every_server_with_tls(pki, tmp_path):
    """The whole local stack with FEEDRET_TLS_*: readiness checks, the root's calls and the demo all use TLS."""
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(SAMPLE_POSTS.read_text().splitlines(keepends=True)[:100]))
    base = free_port_block(5)
    env = {**os.environ, "FEEDRET_TORCH_THREADS": "1", "FEEDRET_TLS_CERT_FILE": str(pki["cert"]),
           "FEEDRET_TLS_KEY_FILE": str(pki["key"]), "FEEDRET_TLS_CA_FILE": str(pki["ca"])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedret.clients.cli", "up", "--posts", str(posts), "--workdir", str(tmp_path / "var"),
         "--broker-port", str(base), "--root-port", str(base + 1), "--member-port", str(base + 2),
         "--shard-base-port", str(base + 3), "--metrics-base-port", str(free_port_block(12))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "Ctrl-C stops every process" in line:
                break
        text = "".join(out)
        assert re.search(r"feedret is up in [\d.]+s: 100 posts searchable", text), text[-3000:]
        assert re.search(r"\n\s+1\s+\d+\s+0\.\d{4}\s+shard [01]\s+\S", text), text[-3000:]
        with FeedretClient(f"127.0.0.1:{base + 1}") as plaintext, pytest.raises(grpc.RpcError):
            plaintext.stats(timeout=2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
