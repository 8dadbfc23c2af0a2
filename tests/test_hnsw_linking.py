"""HNSW inserts do not hold searches back for a whole batch: posts are linked a step at a time."""

from __future__ import annotations

import threading
import time

import numpy as np

from feedret.indexer import shard_index as si
from feedret.indexer.rwlock import RWLock
from feedret.indexer.shard_index import ShardIndex

D = 16


def unit(rng, n):
    v = rng.normal(size=(n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def hnsw(n=300, seed=0):
    ix = ShardIndex(D, index_factory="HNSW16")
    vecs = unit(np.random.default_rng(seed), n)
    return ix, vecs


def test_a_batch_is_linked_into_the_graph_and_every_post_is_found():
    ix, vecs = hnsw()
    ix.upsert(list(range(300)), vecs, created_at=[1.0] * 300, langs=["en"] * 300, indexed_at=1.0,
              model_versions=["m1"] * 300)
    assert ix._ann.ntotal == 300 and ix._buffered() is None  # all linked, none left to search exactly
    for i in (0, 17, 299):
        assert ix.search(vecs[i], 1)[0][0] == i


def test_searches_get_in_between_the_steps(monkeypatch):
    ix, vecs = hnsw()
    ix.upsert(list(range(100)), vecs[:100], created_at=[1.0] * 100, langs=["en"] * 100, indexed_at=1.0,
              model_versions=["m1"] * 100)
    events: list[str] = []
    first_step, go_on = threading.Event(), threading.Event()
    real_add = type(ix._ann).add

    def slow_add(self, rows, slots):
        events.append("step")
        if len(events) == 1:
            first_step.set()
            assert go_on.wait(10)
        return real_add(self, rows, slots)

    monkeypatch.setattr(type(ix._ann), "add", slow_add)
    new = vecs[100:200]
    writer = threading.Thread(target=ix.upsert, args=(list(range(100, 200)), new),
                              kwargs=dict(created_at=[2.0] * 100, langs=["en"] * 100, indexed_at=2.0,
                                          model_versions=["m1"] * 100))
    writer.start()
    assert first_step.wait(10)
    found = []
    searcher = threading.Thread(target=lambda: (found.append(ix.search(new[50], 1)), events.append("search")))
    searcher.start()
    time.sleep(0.1)  # the search queues behind the step in progress
    go_on.set()
    searcher.join(10)
    writer.join(10)
    steps = events.count("step")
    assert steps == 100 // si._ANN_ADD_STEP + 1, events
    assert events.index("search") < len(events) - 1, f"the search waited for every step: {events}"
    # Not linked yet when searched, the new post was still found (exactly, as a buffered post).
    assert found[0][0][0] == 150
    assert ix._ann.ntotal == 200 and ix._buffered() is None


def test_a_post_deleted_before_its_step_is_not_linked(monkeypatch):
    ix, vecs = hnsw()
    steps = []
    real_add = type(ix._ann).add

    def add_then_delete(self, rows, slots):
        steps.append(len(slots))
        real_add(self, rows, slots)
        if len(steps) == 1:
            # As a delete taking the lock between the steps would (this step holds it).
            ix._release(ix._pop_slots([40]))

    monkeypatch.setattr(type(ix._ann), "add", add_then_delete)
    ix.upsert(list(range(64)), vecs[:64], created_at=[1.0] * 64, langs=["en"] * 64, indexed_at=1.0,
              model_versions=["m1"] * 64)
    assert 40 not in ix and len(ix) == 63
    assert ix._ann.ntotal == 63  # 40's slot was never linked
    assert 40 not in ix.search(vecs[40], 10)[0]


def test_a_writer_that_lets_queued_readers_in_first_does():
    lock, order = RWLock(), []
    with lock.write():

        def read():
            with lock.read():
                order.append("read")
                time.sleep(0.05)

        r = threading.Thread(target=read)
        r.start()
        time.sleep(0.05)  # the reader now waits for this writer

        def write():
            with lock.write(after_waiting_readers=True):
                order.append("write")

        w = threading.Thread(target=write)
        w.start()
        time.sleep(0.05)
    r.join(5)
    w.join(5)
    assert order == ["read", "write"]
