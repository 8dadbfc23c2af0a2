"""Turn MovieLens (ml-latest-small) into a sample feed: movies as posts, users as members.

Run:  python -m feedret.dataprep.movielens --ml-dir DIR --out data/sample --posts 3000

Writes posts.jsonl (post events, the format of feedret.events), members.jsonl
(MemberProfile JSON, the format of feedret.members.MemberProfile.from_json), and
copies the MovieLens README.txt (its licence must travel with derivatives) next
to a NOTICE.md. Everything is deterministic: every tie is broken by id or name.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import structlog

from feedret.events import PostEvent, parse_post_event

log = structlog.get_logger(__name__)

NO_GENRES = "(no genres listed)"
MAX_TAGS = 8
MIN_LIKED_RATING = 4.0
# Titles end in "(1995)", sometimes followed by stray whitespace.
_YEAR = re.compile(r"\((\d{4})\)\s*$")

NOTICE = """\
# Notice: derived from MovieLens

`posts.jsonl` and `members.jsonl` are derived from the MovieLens **ml-latest-small**
dataset (ratings, tags and movie titles/genres) by `python -m feedret.dataprep.movielens`:

- each post is one of the {n_posts} most-rated movies: its title, genres and most
  frequent tags as text, its rating count, mean rating and release year as features,
  and its first rating time as `created_at`; the author is a stand-in, `genre:<first genre>`;
- each member is one of the {n_members} users with the most ratings: their three most
  rated genres, their rating count, and their {n_activity} most recent ratings of
  {min_rating} or more of sampled movies, most recent first.

MovieLens is provided by GroupLens Research, University of Minnesota:
F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4: 19:1–19:19.
<https://doi.org/10.1145/2827872>

These files are for **research use only**, under the MovieLens licence in `README.txt`
beside this file (no commercial use, no implied endorsement by the University of
Minnesota or GroupLens, redistribution only under the same conditions).
"""


@dataclass(frozen=True)
class Movie:
    movie_id: int
    title: str
    genres: tuple[str, ...]  # empty when MovieLens lists none


@dataclass(frozen=True)
class Rating:
    user_id: int
    movie_id: int
    rating: float
    timestamp: int


# ---------------------------------------------------------------- reading


def _rows(path: Path) -> Iterable[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def read_movies(path: Path) -> dict[int, Movie]:
    movies = {}
    for row in _rows(path):
        genres = tuple(g for g in row["genres"].split("|") if g and g != NO_GENRES)
        movie = Movie(int(row["movieId"]), row["title"].strip(), genres)
        movies[movie.movie_id] = movie
    return movies


def read_ratings(path: Path) -> list[Rating]:
    return [
        Rating(int(r["userId"]), int(r["movieId"]), float(r["rating"]), int(r["timestamp"]))
        for r in _rows(path)
    ]


def read_tag_counts(path: Path) -> dict[int, Counter[str]]:
    """Tag counts per movie; case and surrounding space are folded so "Funny" == "funny"."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for row in _rows(path):
        tag = " ".join(row["tag"].split()).lower()
        if tag:
            counts[int(row["movieId"])][tag] += 1
    return counts


# ---------------------------------------------------------------- posts


def release_year(title: str) -> int | None:
    match = _YEAR.search(title)
    return int(match.group(1)) if match else None


def top_items(counts: Mapping[Any, int], k: int) -> list[Any]:
    """The k most frequent keys; ties go to the smaller key so output is stable."""
    return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def post_text(movie: Movie, tags: Sequence[str]) -> str:
    parts = [movie.title]
    if movie.genres:
        parts.append("Genres: " + ", ".join(movie.genres))
    if tags:
        parts.append("Tags: " + ", ".join(tags))
    return ". ".join(parts)


def most_rated(ratings: Sequence[Rating], n: int) -> list[int]:
    return top_items(Counter(r.movie_id for r in ratings), n)


def build_posts(
    movies: Mapping[int, Movie],
    ratings: Sequence[Rating],
    tag_counts: Mapping[int, Counter[str]],
    n_posts: int,
) -> list[PostEvent]:
    """The n most-rated movies as upsert events, most rated first."""
    by_movie: dict[int, list[Rating]] = defaultdict(list)
    for r in ratings:
        by_movie[r.movie_id].append(r)
    posts = []
    for movie_id in most_rated(ratings, n_posts):
        movie, rs = movies[movie_id], by_movie[movie_id]
        features: dict[str, float] = {
            # The names training uses (feedret.dataprep.protocol.item_features), so a
            # trained model's quantizer knows them.
            "engagements": len(rs),
            "mean_weight": round(sum(r.rating for r in rs) / len(rs), 2),
        }
        year = release_year(movie.title)
        if year is not None:
            features["release_year"] = year
        first_genre = movie.genres[0].lower() if movie.genres else "none"
        posts.append(
            PostEvent(
                post_id=movie_id,
                op="upsert",
                author_id=f"genre:{first_genre}",
                text=post_text(movie, top_items(tag_counts.get(movie_id, {}), MAX_TAGS)),
                created_at=float(min(r.timestamp for r in rs)),
                lang="en",
                features=features,
            )
        )
    return posts


# ---------------------------------------------------------------- members


def build_members(
    movies: Mapping[int, Movie],
    ratings: Sequence[Rating],
    posts: Sequence[PostEvent],
    n_members: int,
    n_activity: int,
) -> list[dict[str, Any]]:
    """The n most active users as MemberProfile JSON objects."""
    by_user: dict[int, list[Rating]] = defaultdict(list)
    for r in ratings:
        by_user[r.user_id].append(r)
    text_of = {p.post_id: p.text for p in posts}
    members = []
    for user_id in top_items({u: len(rs) for u, rs in by_user.items()}, n_members):
        rs = by_user[user_id]
        genre_counts = Counter(g for r in rs for g in movies[r.movie_id].genres)
        liked = [r for r in rs if r.rating >= MIN_LIKED_RATING and r.movie_id in text_of]
        # Most recent first; same-second ratings are ordered by movie id.
        liked.sort(key=lambda r: (-r.timestamp, r.movie_id))
        members.append(
            {
                "member_id": f"ml-{user_id}",
                "session_id": "demo",
                "profile": {"favourite_genres": ", ".join(top_items(genre_counts, 3))},
                # As training names it (member_state): a member's count is its own
                # distribution in the shared quantizer.
                "features": {"prior_engagements": len(rs)},
                "recent_activity": [
                    {
                        "post_id": r.movie_id,
                        "text": text_of[r.movie_id],
                        "action": f"rated {r.rating:.1f}",
                        "timestamp": float(r.timestamp),
                    }
                    for r in liked[:n_activity]
                ],
            }
        )
    return members


# ---------------------------------------------------------------- writing


def write_jsonl(path: Path, objects: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for obj in objects:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def prepare(
    ml_dir: Path,
    out: Path,
    n_posts: int = 3000,
    n_members: int = 20,
    n_activity: int = 10,
) -> None:
    movies = read_movies(ml_dir / "movies.csv")
    ratings = read_ratings(ml_dir / "ratings.csv")
    posts = build_posts(movies, ratings, read_tag_counts(ml_dir / "tags.csv"), n_posts)
    post_lines = [p.to_json() for p in posts]
    for line in post_lines:
        # Fail here, not in the consumer, if a post would be dead-lettered.
        parse_post_event(json.dumps(line))
    members = build_members(movies, ratings, posts, n_members, n_activity)

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "posts.jsonl", post_lines)
    write_jsonl(out / "members.jsonl", members)
    shutil.copyfile(ml_dir / "README.txt", out / "README.txt")
    (out / "NOTICE.md").write_text(
        NOTICE.format(
            n_posts=len(posts),
            n_members=len(members),
            n_activity=n_activity,
            min_rating=MIN_LIKED_RATING,
        ),
        encoding="utf-8",
    )
    log.info("sample_written", out=str(out), posts=len(posts), members=len(members))


def convert(ml_dir: Path, out: Path) -> None:
    """All of MovieLens in the generic training format (feedret.dataprep.format).

    Every rated movie is an item, every rating an interaction (weight = stars).
    Items carry only features known when the movie appeared (release year);
    engagement counts are computed by training from the training period alone,
    so no feature leaks the evaluation period.
    """
    from feedret.dataprep.format import Interaction, Item, write_dataset

    movies = read_movies(ml_dir / "movies.csv")
    ratings = read_ratings(ml_dir / "ratings.csv")
    tag_counts = read_tag_counts(ml_dir / "tags.csv")
    first_seen: dict[int, int] = {}
    for r in ratings:
        first_seen[r.movie_id] = min(first_seen.get(r.movie_id, r.timestamp), r.timestamp)
    items = []
    for movie_id in sorted(first_seen):
        movie = movies[movie_id]
        year = release_year(movie.title)
        items.append(
            Item(
                item_id=movie_id,
                text=post_text(movie, top_items(tag_counts.get(movie_id, {}), MAX_TAGS)),
                created_at=float(first_seen[movie_id]),
                author_id=f"genre:{movie.genres[0].lower() if movie.genres else 'none'}",
                lang="en",
                features={"release_year": float(year)} if year is not None else {},
            )
        )
    interactions = [Interaction(f"ml-{r.user_id}", r.movie_id, float(r.timestamp), r.rating) for r in ratings]
    meta = {
        "name": "movielens-latest-small",
        "source": "GroupLens MovieLens ml-latest-small (research use only; see README.txt)",
        "weight": "rating, 0.5-5 stars",
    }
    write_dataset(out, items, interactions, meta=meta)
    shutil.copyfile(ml_dir / "README.txt", out / "README.txt")
    log.info("dataset_written", out=str(out), items=len(items), interactions=len(interactions))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml-dir", type=Path, required=True, help="ml-latest-small directory")
    parser.add_argument(
        "--format", choices=("sample", "dataset"), default="sample",
        help="sample: posts.jsonl/members.jsonl for `feedret up`; dataset: the training format",
    )
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    parser.add_argument("--posts", type=int, default=3000, help="number of most-rated movies")
    parser.add_argument("--members", type=int, default=20, help="number of most active users")
    parser.add_argument("--activity", type=int, default=10, help="recent items per member")
    args = parser.parse_args(argv)
    if args.format == "dataset":
        convert(args.ml_dir, args.out)
    else:
        prepare(args.ml_dir, args.out, args.posts, args.members, args.activity)


if __name__ == "__main__":
    main()
