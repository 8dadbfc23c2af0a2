"""gRPC security: TLS servers that refuse plaintext and unknown callers, a plaintext health port
for the kubelet, bearer tokens checked by every server and sent by the root and the clients,
and the root calling its shards with both, with certificates and tokens made here."""

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
from feedret.config import GrpcSecurityConfig, RootConfig, ShardConfig
from feedret.indexer.replica import ShardState
from feedret.server import root as root_server
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server, set_serving
from feedret.clients.client import AsyncFeedretClient
from feedret.grpc_client import with_token
from feedret.server.grpc_auth import TokenFile
from feedret.server.grpc_security import channel_credentials
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import SAMPLE_POSTS, free_port_block, make_certificates

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")

DIM = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ours = make_certificates(d, "feedret")
    other = make_certificates(d, "other")  # a CA the servers do not trust
    return {**ours, "other_ca": other["ca"], "other_cert": other["cert"], "other_key": other["key"]}


def tls_config(pki, **extra) -> GrpcSecurityConfig:
    return GrpcSecurityConfig(tls_cert_file=pki["cert"], tls_key_file=pki["key"], tls_ca_file=pki["ca"], **extra)


def shard_state(shard: int) -> ShardState:
    state = ShardState(config=ShardConfig(shard_id=shard, num_shards=2), topic="post-vectors")
    rng = np.random.default_rng(shard)
    vecs = rng.normal(size=(50, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    state.apply([(i, pb.PostVectorEvent(post_id=100 * shard + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                                        created_at=1e9, lang="en", model_version="m1")) for i, v in enumerate(vecs)],
                now=2e9)
    return state


def start_shard(shard: int, security: GrpcSecurityConfig | None):
    servicer = ShardServicer(shard_state(shard), "in-process")
    server, health, port = build_server(
        "127.0.0.1", 0, 4,
        [lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s),
         lambda s: pb_grpc.add_IndexAdminServicer_to_server(servicer, s)],
        shard_server.SERVICE_NAMES, security=security,
    )
    server.start()
    set_serving(health, shard_server.SERVICE_NAMES, True)
    return server, f"127.0.0.1:{port}"


def lookup(channel: grpc.Channel, post_id: int = 1) -> pb.LookupResponse:
    return pb_grpc.IndexAdminStub(channel).Lookup(pb.LookupRequest(post_id=post_id), timeout=5)


@needs_openssl
def test_settings_that_cannot_work_fail_at_start(pki, tmp_path):
    with pytest.raises(ValidationError, match="needs both"):
        GrpcSecurityConfig(tls_cert_file=pki["cert"])
    with pytest.raises(ValidationError, match="does not exist"):
        GrpcSecurityConfig(tls_cert_file=pki["cert"], tls_key_file=tmp_path / "missing.key")
    with pytest.raises(ValidationError, match="FEEDRET_HEALTH_PORT is for TLS servers"):
        GrpcSecurityConfig(health_port=8081)
    assert not GrpcSecurityConfig().enabled


@needs_openssl
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


@needs_openssl
def test_without_client_auth_any_tls_caller_is_served(pki):
    server, address = start_shard(0, tls_config(pki, tls_client_auth=False))
    try:
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(pki["ca"].read_bytes())) as channel:
            assert lookup(channel).found
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            lookup(channel)
    finally:
        server.stop(0)


@needs_openssl
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


@needs_openssl
def test_the_root_calls_its_shards_with_tls_and_a_client_reaches_it_by_its_certificate_name(pki):
    security = tls_config(pki, tls_server_name="feedret.internal")
    shards = [start_shard(i, security) for i in range(2)]
    servicer = root_server.RootServicer(
        RootConfig(shard_addresses=",".join(a for _, a in shards), member_address=""), security
    )
    root, _, port = build_server("127.0.0.1", 0, 4, [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                 root_server.SERVICE_NAMES, security=security)
    root.start()
    try:
        # "localhost" rather than 127.0.0.1, checked against the name the certificate carries.
        with FeedretClient(f"localhost:{port}", credentials=channel_credentials(security), server_name="feedret.internal") as client:
            result = client.retrieve(vector=[0.3] * DIM, k=100)
        assert not result.partial and len(result.post_ids) == 100
        assert {int(i) // 100 for i in result.post_ids} == {0, 1}  # both shards answered, over TLS
        with FeedretClient(f"127.0.0.1:{port}") as plaintext, pytest.raises(grpc.RpcError):
            plaintext.retrieve(vector=[0.3] * DIM, k=10)
    finally:
        root.stop(0)
        for server, _ in shards:
            server.stop(0)


@needs_openssl
@pytest.mark.e2e
def test_feedret_up_runs_every_server_with_tls_and_tokens(pki, tmp_path):
    """The whole local stack with FEEDRET_TLS_* and tokens: readiness checks, the root's calls
    to shards and the member service, and the demo's retrievals all use TLS and the token."""
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(SAMPLE_POSTS.read_text().splitlines(keepends=True)[:100]))
    base = free_port_block(5)
    env = {**os.environ, "FEEDRET_TORCH_THREADS": "1", "FEEDRET_TLS_CERT_FILE": str(pki["cert"]),
           "FEEDRET_TLS_KEY_FILE": str(pki["key"]), "FEEDRET_TLS_CA_FILE": str(pki["ca"]),
           "FEEDRET_AUTH_TOKENS_FILE": str(tokens_file(tmp_path / "tokens", "stack-token")),
           "FEEDRET_AUTH_TOKEN_FILE": str(tokens_file(tmp_path / "token", "stack-token")),
           # A pod's setting: on one host every server would bind it; feedret up must not.
           "FEEDRET_HEALTH_PORT": str(free_port_block(1))}
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
        security = GrpcSecurityConfig(tls_cert_file=pki["cert"], tls_key_file=pki["key"], tls_ca_file=pki["ca"])
        with FeedretClient(f"127.0.0.1:{base + 1}", credentials=channel_credentials(security)) as no_token:
            with pytest.raises(grpc.RpcError) as err:
                no_token.stats(timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The CLI reads the same settings from the environment.
        cli = subprocess.run([sys.executable, "-m", "feedret.clients.cli", "stats", "--root", f"127.0.0.1:{base + 1}"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert cli.returncode == 0 and "100" in cli.stdout, cli.stdout + cli.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- bearer tokens


def tokens_file(path: Path, *tokens: str) -> Path:
    path.write_text("# accepted tokens\n\n" + "".join(f"{t}\n" for t in tokens))
    return path


def test_a_token_file_ignores_comments_reloads_when_rewritten_and_must_not_be_empty(tmp_path):
    f = tokens_file(tmp_path / "tokens", "alpha", "beta")
    tokens = TokenFile(f)
    assert tokens.tokens() == ("alpha", "beta") and tokens.first() == "alpha"
    replacement = tokens_file(tmp_path / "tokens.new", "gamma")
    replacement.replace(f)  # as Kubernetes swaps a Secret's files: a new inode
    assert tokens.tokens() == ("gamma",)
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(tokens_file(tmp_path / "empty"))


def test_a_server_with_tokens_refuses_calls_without_an_accepted_one_but_not_health_checks(tmp_path):
    accepted = tokens_file(tmp_path / "tokens", "s3cret", "next-s3cret")
    server, address = start_shard(0, GrpcSecurityConfig(auth_tokens_file=accepted))
    try:
        for token in (None, "wrong", "s3cre"):
            with with_token(grpc.insecure_channel(address), (lambda t=token: t) if token else None) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    lookup(channel)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
                assert "bearer token" in err.value.details()
        for token in ("s3cret", "next-s3cret"):  # both, so a rotation can overlap
            with with_token(grpc.insecure_channel(address), lambda t=token: t) as channel:
                assert lookup(channel).found
        with grpc.insecure_channel(address) as channel:  # the kubelet's probe carries no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Rotation: the Secret's file changes, the server follows without a restart.
        tokens_file(tmp_path / "rotated", "rotated").replace(accepted)
        with with_token(grpc.insecure_channel(address), lambda: "s3cret") as channel, pytest.raises(grpc.RpcError) as err:
            lookup(channel)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with with_token(grpc.insecure_channel(address), lambda: "rotated") as channel:
            assert lookup(channel).found
    finally:
        server.stop(0)


def test_the_root_checks_callers_tokens_and_sends_its_own_to_the_shards(tmp_path):
    shard_tokens = tokens_file(tmp_path / "shard-tokens", "root-to-shards")
    shards = [start_shard(i, GrpcSecurityConfig(auth_tokens_file=shard_tokens)) for i in range(2)]
    root_security = GrpcSecurityConfig(auth_tokens_file=tokens_file(tmp_path / "root-tokens", "backend"),
                                       auth_token_file=tokens_file(tmp_path / "root-token", "root-to-shards"))
    config = RootConfig(shard_addresses=",".join(a for _, a in shards), member_address="")
    servicer = root_server.RootServicer(config, root_security)
    root, _, port = build_server("127.0.0.1", 0, 4, [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                                 root_server.SERVICE_NAMES, security=root_security)
    root.start()
    # The same shards behind a root that has no token of its own: they refuse it.
    tokenless = root_server.RootServicer(config, GrpcSecurityConfig())
    bare, _, bare_port = build_server("127.0.0.1", 0, 4, [lambda s: pb_grpc.add_RetrievalServiceServicer_to_server(tokenless, s)],
                                      root_server.SERVICE_NAMES)
    bare.start()
    try:
        with FeedretClient(f"127.0.0.1:{port}", token="backend") as client:
            result = client.retrieve(vector=[0.3] * DIM, k=100)
        assert not result.partial and {int(i) // 100 for i in result.post_ids} == {0, 1}
        with FeedretClient(f"127.0.0.1:{port}") as client, pytest.raises(grpc.RpcError) as err:
            client.retrieve(vector=[0.3] * DIM, k=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        async def retrieve_async():
            client = AsyncFeedretClient(f"127.0.0.1:{port}", token=lambda: "backend")
            try:
                return await client.retrieve(vector=[0.3] * DIM, k=10)
            finally:
                await client.close()

        import asyncio

        assert len(asyncio.run(retrieve_async()).post_ids) == 10
        with FeedretClient(f"127.0.0.1:{bare_port}") as client, pytest.raises(grpc.RpcError) as err:
            client.retrieve(vector=[0.3] * DIM, k=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no shard answered (shard 0: UNAUTHENTICATED; shard 1: UNAUTHENTICATED)" in err.value.details()
    finally:
        root.stop(0)
        bare.stop(0)
        for server, _ in shards:
            server.stop(0)
