"""MovieLens -> sample feed converter, on a hand-made miniature of the real files."""

import json
from pathlib import Path

from feedret.dataprep.movielens import prepare, release_year
from feedret.events import PostEvent, parse_post_event
from feedret.members import MemberProfile

ROOT = Path(__file__).resolve().parents[1]


def write_ml(d: Path) -> Path:
    d.mkdir()
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,Toy Story (1995),Adventure|Animation\n'
        '2,"Heat, The (1995) ",Action|Crime\n'
        "3,No Year,(no genres listed)\n"
    )
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "10,1,5.0,100\n10,2,4.0,300\n10,3,2.0,200\n"
        "11,1,4.5,50\n11,2,3.0,60\n"
        "12,1,3.0,70\n"
    )
    (d / "tags.csv").write_text("userId,movieId,tag,timestamp\n10,1,Pixar,1\n11,1, pixar ,2\n11,1,toys,3\n")
    (d / "README.txt").write_text("MovieLens licence\n")
    return d


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_posts_are_the_most_rated_movies_with_text_features_and_first_rating_time(tmp_path):
    out = tmp_path / "out"
    prepare(write_ml(tmp_path / "ml"), out, n_posts=2, n_members=2, n_activity=5)
    posts = [parse_post_event(json.dumps(p)) for p in read(out / "posts.jsonl")]
    assert all(isinstance(p, PostEvent) for p in posts)
    assert [p.post_id for p in posts] == [1, 2]
    toy = posts[0]
    assert toy.text == "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, toys"
    assert toy.created_at == 50.0 and toy.author_id == "genre:adventure"
    assert toy.features == {"engagements": 3, "mean_weight": 4.17, "release_year": 1995}
    assert (out / "README.txt").read_text() == "MovieLens licence\n"
    assert "GroupLens" in (out / "NOTICE.md").read_text()


def test_members_are_the_most_active_users_with_liked_posts_newest_first(tmp_path):
    out = tmp_path / "out"
    prepare(write_ml(tmp_path / "ml"), out, n_posts=3, n_members=1, n_activity=5)
    (member,) = [MemberProfile.from_json(m) for m in read(out / "members.jsonl")]
    assert member.member_id == "ml-10"
    assert [a.post_id for a in member.recent_activity] == [2, 1]  # rating >= 4, newest first
    assert member.features == {"prior_engagements": 3.0}


def test_output_is_deterministic(tmp_path):
    ml = write_ml(tmp_path / "ml")
    prepare(ml, tmp_path / "a", 3, 2, 5)
    prepare(ml, tmp_path / "b", 3, 2, 5)
    for name in ("posts.jsonl", "members.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_release_year_tolerates_trailing_space_and_absence():
    assert release_year("Heat (1995) ") == 1995
    assert release_year("No Year") is None


def test_committed_sample_parses_and_carries_its_licence():
    posts = (ROOT / "data" / "sample" / "posts.jsonl").read_text().splitlines()
    assert len(posts) >= 2000
    assert all(isinstance(parse_post_event(line), PostEvent) for line in posts)
    assert (ROOT / "data" / "sample" / "README.txt").exists()
