"""Odd requests against a root over two shards: each gets an answer or INVALID_ARGUMENT with a reason.

Never INTERNAL, never a crash, never scores that are not numbers; and the root
answers a plain request afterwards as before.
"""

from __future__ import annotations

import itertools
import math

import grpc
import numpy as np
import pytest

from feedret.config import RootConfig
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from test_root_fanout import DIM, exact_top, recording_shards, start_root

RNG = np.random.default_rng(7)
GOOD = RNG.normal(size=DIM).astype(np.float32)
VECTORS = {
    "good": GOOD.tolist(),
    "zeros": [0.0] * DIM,
    "nan": [float("nan")] * DIM,
    "inf": [float("inf")] + [0.0] * (DIM - 1),
    "overflowing": [3e38] * DIM,
    "subnormal": [1e-45] * DIM,
    "too short": GOOD[:5].tolist(),
    "too long": GOOD.tolist() * 2,
    "empty": [],
}
MAX_K = RootConfig().max_k
KS = [0, -1, 1, 50, 2049, MAX_K, MAX_K + 1, 2**31 - 1, -(2**31)]
FILTERS = {
    "none": None,
    "exclude half": pb.Filters(exclude_post_ids=list(range(0, 1100))),
    "negative age": pb.Filters(max_age_seconds=-5),
    "largest age": pb.Filters(max_age_seconds=2**63 - 1),
    "smallest age": pb.Filters(max_age_seconds=-(2**63)),
    "odd languages": pb.Filters(languages=["en", "", "x" * 10_000]),
    "extreme ids": pb.Filters(exclude_post_ids=[2**63 - 1, -(2**63), -1]),
}
# Refused for their vector: "subnormal" is not zero, but its float32 scores all are.
INVALID_VECTORS = {"zeros", "subnormal", "nan", "inf", "overflowing", "too short", "too long", "empty"}


@pytest.fixture(scope="module")
def root():
    servers, addresses, _, vectors = recording_shards(np.random.default_rng(1), (200, 200))
    server, address, _ = start_root(addresses)
    channel = grpc.insecure_channel(address)
    yield pb_grpc.RetrievalServiceStub(channel), vectors
    channel.close()
    server.stop(0)
    for s in servers:
        s.stop(0)


def test_every_odd_request_gets_an_answer_or_invalid_argument_with_a_reason(root):
    stub, vectors = root
    outcomes = {}
    for (vname, values), k, (fname, filters) in itertools.product(VECTORS.items(), KS, FILTERS.items()):
        request = pb.RetrieveRequest(k=k, vector=pb.QueryVector(values=values))
        if filters is not None:
            request.filters.CopyFrom(filters)
        case = (vname, k, fname)
        try:
            reply = stub.Retrieve(request, timeout=10)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
            assert err.details(), case
            outcomes[case] = "invalid"
            continue
        scores = list(reply.candidates.scores)
        assert all(math.isfinite(s) for s in scores), case
        assert scores == sorted(scores, reverse=True) and len(scores) <= k, case
        outcomes[case] = "answered"
    for (vname, k, fname), outcome in outcomes.items():
        refused_filter = fname in ("negative age", "smallest age")
        expected_invalid = vname in INVALID_VECTORS or not 1 <= k <= MAX_K or refused_filter
        if vname == "good" and 1 <= k <= MAX_K and not refused_filter:
            assert outcome == "answered", (vname, k, fname)
        elif expected_invalid:
            assert outcome == "invalid", (vname, k, fname)
    # The root serves on, exactly.
    reply = stub.Retrieve(pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=GOOD.tolist())), timeout=5)
    assert list(reply.candidates.post_ids) == exact_top(vectors, GOOD)[:10].tolist()


def test_a_zero_query_is_refused_saying_why(root):
    stub, _ = root
    with pytest.raises(grpc.RpcError) as err:
        stub.Retrieve(pb.RetrieveRequest(k=10, vector=pb.QueryVector(values=[0.0] * DIM)), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no direction" in err.value.details()


@pytest.mark.parametrize("values, dimension, says", [
    ([float("nan"), 1.0, 1.0, 1.0], 0, "NaN or infinite"),
    ([1.0, 1.0, 1.0, float("inf")], 2, "NaN or infinite"),  # outside the served prefix, still refused
    ([0.0] * 4, 0, "it is all zeros"),
    ([0.0, 0.0, 1.0, 1.0], 2, "its first 2 dimensions are all zeros"),
    ([1e-23] * 4, 0, "too small for float32"),  # each square underflows float32
    ([1e30, 1.0, 1.0, 1.0], 0, "too large"),
    ([1.0, 1.0, 1e30, 1e30], 2, None),  # large, but past the prefix the index scores with
    ([1e19, 1e19, 0.0, 0.0], 0, None),  # a norm of 1.4e19 still fits float32
])
def test_query_vector_checks_say_what_is_wrong(values, dimension, says):
    from feedret.server.grpc_common import InvalidRequest, query_vector

    if says is None:
        assert query_vector(values, dimension, 4 if dimension else 0).tolist() == pytest.approx(values)
        return
    with pytest.raises(InvalidRequest, match=says):
        query_vector(values, dimension, 4 if dimension else 0)
