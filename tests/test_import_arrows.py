"""Imports run one way, with the data: a feed backend installs the client library without the
servers, and the client must not drag server, index or model code in (#16)."""

import importlib.util
import subprocess
import sys
from pathlib import Path


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_client_library_imports_only_protos_and_the_shared_core():
    modules = loaded_after("import feedret.clients.client")
    reach_backs = sorted(m for m in modules if m.split(".")[:2] in (["feedret", "server"], ["feedret", "indexer"]))
    heavy = sorted(m for m in ("faiss", "torch", "transformers", "kafka") if m in modules)
    assert not reach_backs and not heavy, f"the client pulls in {reach_backs + heavy}"


def test_the_root_and_the_member_service_start_without_the_index_library():
    # Neither holds an index: they must not need faiss (nor the shard's code) to start.
    for server in ("root", "member"):
        modules = loaded_after(f"import feedret.server.{server}")
        pulled = sorted(m for m in modules if m == "faiss" or m.startswith("feedret.indexer"))
        assert not pulled, f"feedret.server.{server} pulls in {pulled}"


def test_the_root_answers_for_the_index_without_reading_kafka():
    # Kafka is upstream of the shards: the root reads neither a topic nor a consumer group's offsets.
    assert not any(m == "kafka" or m.startswith("kafka.") for m in loaded_after("import feedret.server.root"))
    # Not even late, inside a method (Stats once built a KafkaAdminClient there).
    source = Path(importlib.util.find_spec("feedret.server.root").origin).read_text()
    assert "kafka" not in source.lower(), "feedret.server.root talks to Kafka"


def test_training_and_evaluation_share_the_protocol_without_importing_each_other():
    assert not any(m.startswith("feedret.evaluation") for m in loaded_after("import feedret.training.trainer"))
    assert not any(m.startswith("feedret.training") for m in loaded_after("import feedret.evaluation.evaluate"))


REPLICA = ("feedret.indexer.replica", "feedret.indexer.applier", "feedret.indexer.upkeep")


def test_the_shard_replica_is_indexer_code_without_the_server():
    # A shard replica (state, apply, applier, sweeper, snapshotter) is the index's domain; the gRPC
    # servicer is feedret.server.shard's. The replica reads the topic's messages (feedret.v1), no RPCs.
    for module in REPLICA:
        modules = loaded_after(f"import {module}")
        pulled = sorted(m for m in modules if m.split(".")[:2] == ["feedret", "server"] or m == "feedret.v1.feedret_pb2_grpc")
        assert not pulled, f"{module} pulls in {pulled}"
    assert "grpc" not in loaded_after("import feedret.indexer.replica")


def test_the_replica_threads_load_no_grpc():
    # The gRPC interceptor's metrics are feedret.server.grpc_metrics'; the shard's, feedret.indexer.metrics.
    assert "grpc" not in loaded_after("import feedret.indexer.applier, feedret.indexer.upkeep")
