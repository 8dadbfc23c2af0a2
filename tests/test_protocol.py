"""The dataset format and the split/moment/example protocol on a hand-made log."""

import numpy as np
import pytest

from feedret.dataprep.format import DatasetError, Interaction, Item, MemberInfo, read_dataset, write_dataset
from feedret.dataprep.protocol import (
    candidate_mask,
    item_features,
    member_state,
    moments,
    popularity,
    sample,
    time_split,
    training_examples,
)

ITEMS = {i: Item(i, f"item {i}", created_at=float(i * 10), features={"year": 2000.0 + i}) for i in range(1, 6)}
LOG = [
    Interaction("a", 1, 10.0, 5.0), Interaction("a", 2, 20.0, 2.0), Interaction("a", 3, 30.0, 4.0),
    Interaction("a", 4, 30.0, 4.5), Interaction("b", 1, 15.0, 4.0), Interaction("b", 5, 60.0, 5.0),
]


def test_dataset_round_trips_and_rejects_bad_rows(tmp_path):
    write_dataset(tmp_path, list(ITEMS.values()), LOG, [MemberInfo("a", {"title": "engineer"})], {"name": "t"})
    ds = read_dataset(tmp_path)
    assert ds.items == ITEMS and len(ds.interactions) == 6 and ds.members["a"].profile == {"title": "engineer"}
    assert [i.timestamp for i in ds.interactions] == sorted(i.timestamp for i in LOG)
    (tmp_path / "interactions.csv").write_text("member_id,item_id,timestamp,weight\na,99,1,1\n")
    with pytest.raises(DatasetError, match="interactions.csv:2: item_id 99 is not in items.jsonl"):
        read_dataset(tmp_path)


def test_time_split_keeps_one_timestamp_on_one_side():
    split = time_split(LOG, test_fraction=0.5)
    assert split.cutoff == 30.0
    assert all(i.timestamp < 30 for i in split.train) and all(i.timestamp >= 30 for i in split.test)


def test_item_features_count_only_the_given_period():
    feats = item_features(ITEMS, [i for i in LOG if i.timestamp < 30])
    assert feats[1] == {"year": 2001.0, "engagements": 2.0, "mean_weight": 4.5}
    assert feats[3] == {"year": 2003.0, "engagements": 0.0}


def test_moments_group_a_burst_and_carry_only_the_past():
    ms = moments(LOG, since=30.0, like_threshold=4.0)
    assert [(m.member_id, m.timestamp, m.positives, m.prior) for m in ms] == [("a", 30.0, (3, 4), 2), ("b", 60.0, (5,), 1)]
    assert all(m.cold_start for m in ms)


def test_member_state_lists_liked_history_newest_first():
    state = member_state("a", LOG[:4], ITEMS, MemberInfo("a", {"title": "x"}), max_recent=2, like_threshold=4.0)
    assert [a.post_id for a in state.recent_activity] == [4, 3]
    assert state.features["prior_engagements"] == 4.0 and state.profile == {"title": "x"}


def test_training_examples_never_offer_seen_items_as_fair_negatives():
    examples = training_examples(LOG, ITEMS, {}, like_threshold=4.0, max_recent=5, max_per_member=None, seed=0)
    by_pos = {(e.member.member_id, e.positive): e for e in examples}
    assert set(by_pos) == {("a", 1), ("a", 3), ("a", 4), ("b", 1), ("b", 5)}
    assert by_pos[("a", 3)].seen == {1, 2, 3, 4}
    assert [a.post_id for a in by_pos[("a", 3)].member.recent_activity] == [1]


def test_popularity_candidates_and_sampling():
    assert popularity(LOG, 4.0) == {1: 2.0, 3: 1.0, 4: 1.0, 5: 1.0}
    ids = np.array([1, 2, 3, 4, 5])
    created = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    m = moments(LOG, since=30.0, like_threshold=4.0)[0]
    assert candidate_mask(ids, created, m).tolist() == [False, False, True, False, False]
    assert sample(list(range(10)), 3, seed=1) == sample(list(range(10)), 3, seed=1)
    assert len(sample(list(range(10)), 3, seed=1)) == 3


def test_the_data_names_the_action_and_the_prompt_says_it(tmp_path):
    """Every activity line said "rated {weight}", whatever the interaction was (a click, a save,
    a to-read list); an optional `action` column now names it, and data without one reads as before."""
    from feedret.encoder.prompts import member_prompt

    log = [Interaction("a", 1, 10.0, 1.0, "saved"), Interaction("a", 2, 20.0, 1.0, "clicked"),
           Interaction("a", 3, 30.0, 4.0)]
    write_dataset(tmp_path, list(ITEMS.values()), log)
    ds = read_dataset(tmp_path)
    assert [i.action for i in ds.interactions] == ["saved", "clicked", ""]
    state = member_state("a", ds.interactions, ITEMS)
    assert [a.action for a in state.recent_activity] == ["rated 4", "clicked", "saved"]
    prompt = member_prompt(state, None)
    assert "- clicked: item 2" in prompt and "- saved: item 1" in prompt and "- rated 4: item 3" in prompt
    # A dataset without actions writes no action column: its files, and so its prompts, are unchanged.
    write_dataset(tmp_path / "plain", list(ITEMS.values()), LOG)
    assert (tmp_path / "plain" / "interactions.csv").read_text().splitlines()[0] == "member_id,item_id,timestamp,weight"


def test_engagements_as_of_a_moment_count_only_what_came_before_it():
    # A training example's post must not carry its own engagement or any later one.
    from feedret.dataprep.protocol import EngagementsAsOf

    items = {1: Item(1, "a", 0.0, features={"year": 1999.0}), 2: Item(2, "b", 0.0)}
    log = [Interaction("x", 1, 10.0, 5.0), Interaction("y", 1, 20.0, 3.0), Interaction("z", 1, 20.0, 4.0)]
    as_of = EngagementsAsOf(items, log)
    assert as_of.features(1, 10.0) == {"year": 1999.0, "engagements": 0.0}  # not its own engagement
    assert as_of.features(1, 15.0) == {"year": 1999.0, "engagements": 1.0, "mean_weight": 5.0}
    assert as_of.features(1, 20.5) == item_features(items, log)[1] == {"year": 1999.0, "engagements": 3.0, "mean_weight": 4.0}
    assert as_of.features(2, 1e12) == {"engagements": 0.0} == item_features(items, log)[2]
