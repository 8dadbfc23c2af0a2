"""fill_candidates writes exactly what extend() would, byte for byte."""

import numpy as np
import pytest

from feedret.server.grpc_common import fill_candidates
from feedret.v1 import feedret_pb2 as pb


def by_extend(ids, scores, shards):
    c = pb.Candidates()
    c.post_ids.extend(np.asarray(ids, np.int64).tolist())
    c.scores.extend(np.asarray(scores, np.float32).tolist())
    if shards is not None:
        c.shards.extend(np.asarray(shards).tolist())
    return c


@pytest.mark.parametrize("n", [0, 1, 31, 2000])
@pytest.mark.parametrize("shard_range", [None, 2, 127, 128, 1000])
def test_same_message_as_extend(n, shard_range):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
    ids[: min(n, 3)] = [0, 127, 128][: min(n, 3)]
    scores = rng.normal(size=n).astype(np.float32)
    scores[: min(n, 2)] = [-0.0, np.float32(1 / 3)][: min(n, 2)]
    shards = None if shard_range is None else rng.integers(0, shard_range, n).astype(np.int32)
    c = pb.Candidates()
    fill_candidates(c, ids, scores, shards)
    expected = by_extend(ids, scores, shards)
    assert c == expected
    assert c.SerializeToString() == expected.SerializeToString()


def test_appends_to_what_is_there():
    c = pb.Candidates()
    fill_candidates(c, np.array([5]), np.array([0.5], np.float32), np.array([1]))
    fill_candidates(c, np.array([6, 7]), np.array([0.25, 0.125], np.float32), np.array([0, 1]))
    assert list(c.post_ids) == [5, 6, 7] and list(c.scores) == [0.5, 0.25, 0.125] and list(c.shards) == [1, 0, 1]
