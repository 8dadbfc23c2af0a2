"""Bulk import of vectors embedded elsewhere: the file format's checks (one clear line for a bad
file), the stream's soundness checks on every row, and each row as the consumer's own upsert."""

from __future__ import annotations

import numpy as np
import pytest

from feedret.consumer.vector_import import ImportFileError, checked_rows, read_vector_file, vector_record
from feedret.vector_events import decode_record

from conftest import feedret_cli


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_file_is_read_with_its_optional_arrays_and_each_row_becomes_the_consumers_upsert(tmp_path):
    path = tmp_path / "v.npz"
    vecs = unit_rows(4).astype(np.float16)  # a half-precision export is widened, as a float16 model's are
    np.savez_compressed(path, post_id=np.array([7, 8, 9, 10]), vector=vecs, created_at=np.full(4, 1.7e9),
                        lang=np.array([b"en", b"de", b"", b"fr"]), model_version=np.array(b"enc-v2"))  # bytes, too
    f = read_vector_file(path)
    assert (len(f), f.dimension, f.model_version, f.langs[1]) == (4, 8, "enc-v2", "de")
    rec = decode_record(b"9", vector_record(f, 2, "enc-v2", 5.0).SerializeToString())
    assert (rec.post_id, rec.lang, rec.created_at, rec.model_version, rec.embedded_at) == (9, "", 1.7e9, "enc-v2", 5.0)
    np.testing.assert_allclose(rec.vector, vecs[2].astype(np.float32))


def test_unsound_rows_are_counted_by_reason_and_the_rest_pass(tmp_path):
    vecs = unit_rows(6)
    vecs[1] = np.nan
    vecs[2] = 0
    vecs[3] *= 1.5
    created = np.full(6, 1e9)
    created[4] = np.inf
    path = tmp_path / "v.npz"
    np.savez(path, post_id=np.array([1, 2, 3, 4, 5, -6]), vector=vecs, created_at=created)
    (rows, rejected), = checked_rows(read_vector_file(path))
    assert rows.tolist() == [0]
    assert rejected == {"non_finite": 1, "zero": 1, "not_unit_norm": 1, "created_at": 1, "post_id": 1}


@pytest.mark.parametrize("arrays, says", [
    ({"post_id": np.arange(3), "vector": unit_rows(3)}, "lacks the array created_at"),
    ({"post_id": np.arange(3), "vector": unit_rows(2), "created_at": np.zeros(3)}, "vector must be a float array of shape (3, dimension)"),
    ({"post_id": np.arange(3.0), "vector": unit_rows(3), "created_at": np.zeros(3)}, "post_id must be a 1-d integer array"),
    ({"post_id": np.arange(3), "vector": unit_rows(3), "created_at": np.zeros(2)}, "created_at must be 3 numbers"),
    ({"post_id": np.arange(3), "vector": unit_rows(3), "created_at": np.zeros(3), "lang": np.zeros(3)}, "lang must be 3 strings"),
])
def test_a_malformed_file_is_refused_saying_what_is_wrong(tmp_path, arrays, says):
    path = tmp_path / "v.npz"
    np.savez(path, **arrays)
    with pytest.raises(ImportFileError, match=r".*" + says.replace("(", r"\(").replace(")", r"\)")):
        read_vector_file(path)


def test_the_cli_refuses_a_bad_file_in_one_line_before_reaching_kafka(tmp_path):
    (tmp_path / "notes.npz").write_text("not numpy")
    np.savez_compressed(tmp_path / "whole.npz", post_id=np.arange(500), vector=unit_rows(500), created_at=np.zeros(500))
    (tmp_path / "torn.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:-200])  # a copy cut short
    np.savez(tmp_path / "nomodel.npz", post_id=np.arange(2), vector=unit_rows(2), created_at=np.zeros(2))
    for name, says in (("notes.npz", "is not a NumPy .npz file"), ("nomodel.npz", "pass --model-version"),
                       ("torn.npz", "torn.npz")):
        proc = feedret_cli("import-vectors", str(tmp_path / name), "--bootstrap", "127.0.0.1:1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert says in line, line
