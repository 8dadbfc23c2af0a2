"""The generated code committed under protos/ must match the .proto files."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = REPO / "protos" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make proto`"


def test_services_are_in_package_feedret_v1():
    from feedret.v1 import feedret_pb2 as pb

    assert pb.DESCRIPTOR.package == "feedret.v1"
    assert set(pb.DESCRIPTOR.services_by_name) == {
        "RetrievalService",
        "MemberEmbeddingService",
        "ShardService",
        "IndexAdmin",
    }


def test_the_shard_replica_reads_the_schemas_vector_ops():
    # feedret.indexer.replica applies decoded PostVectorEvents without importing the protos.
    from feedret.indexer.replica import VectorOp
    from feedret.v1 import feedret_pb2 as pb

    assert {op.name: op.value for op in VectorOp} == {
        name.removeprefix("OP_"): value for name, value in pb.PostVectorEvent.Op.items()
    }
