"""`to_result`: the client keeps the packed candidate arrays as numpy and builds Candidate objects only when asked."""

import numpy as np

from feedret.clients.client import Candidate, to_result
from feedret.v1 import feedret_pb2 as pb


def response(ids, scores, shards, **fields) -> pb.RetrieveResponse:
    resp = pb.RetrieveResponse(**fields)
    resp.candidates.post_ids.extend(ids)
    resp.candidates.scores.extend(scores)
    resp.candidates.shards.extend(shards)
    return resp


def test_result_arrays_and_candidates_agree():
    ids = [2**62 + 5, 7, 0]
    result = to_result(response(ids, [0.75, 0.5, -0.25], [1, 0, 1], partial=True, failed_shards=[2],
                                model_version="v3", request_id="r1"))
    assert result.ids.dtype == np.int64 and result.ids.tolist() == ids
    assert result.scores.dtype == np.float32 and result.scores.tolist() == [0.75, 0.5, -0.25]
    assert result.shards.tolist() == [1, 0, 1]
    assert result.post_ids == ids and all(type(p) is int for p in result.post_ids)
    assert result.candidates == [Candidate(2**62 + 5, 0.75, 1), Candidate(7, 0.5, 0), Candidate(0, -0.25, 1)]
    assert result.candidates is result.candidates  # built once
    assert (result.partial, result.failed_shards, result.model_version, result.request_id) == (True, [2], "v3", "r1")


def test_scores_keep_their_float32_values():
    scores = np.array([0.1, 1 / 3], np.float32)
    result = to_result(response([1, 2], scores.tolist(), [0, 0]))
    assert [c.score for c in result.candidates] == scores.tolist()


def test_empty_result():
    result = to_result(pb.RetrieveResponse())
    assert result.candidates == [] and result.post_ids == [] and len(result.ids) == 0
