"""The on-disk interaction dataset that training and evaluation read (docs/data-format.md).

A dataset is a directory:

- `items.jsonl`: one post per line: `item_id` (int), `text`, `created_at` (Unix
  seconds), optional `author_id`, `lang`, `features` (name -> number);
- `interactions.csv`: `member_id,item_id,timestamp,weight`, one engagement per row
  (weight: any positive strength, e.g. a rating, dwell seconds, 1 for a click), and an
  optional `action` column naming the engagement (`clicked`, `saved`, `to-read`): the
  member prompt writes it; without it, the prompt says `rated <weight>`;
- `members.jsonl` (optional): `member_id`, `profile` (name -> text), `features`;
- `dataset.json` (optional): name, source, licence.

Any platform's logs can be brought into this shape with a small converter, as
`feedret.dataprep.movielens.convert` does for MovieLens.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from feedret.events import PostEvent

ITEMS = "items.jsonl"
INTERACTIONS = "interactions.csv"
MEMBERS = "members.jsonl"
META = "dataset.json"
INTERACTION_FIELDS = ("member_id", "item_id", "timestamp", "weight")
OPTIONAL_INTERACTION_FIELDS = ("action",)


class DatasetError(ValueError):
    """A dataset file does not follow the format; the message names file and line."""


@dataclass(frozen=True)
class Item:
    item_id: int
    text: str
    created_at: float
    author_id: str = ""
    lang: str = ""
    features: Mapping[str, float] = field(default_factory=dict)

    def to_event(self) -> PostEvent:
        return PostEvent(
            post_id=self.item_id,
            op="upsert",
            author_id=self.author_id,
            text=self.text,
            created_at=self.created_at,
            lang=self.lang,
            features=dict(self.features),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "text": self.text,
            "created_at": self.created_at,
            "author_id": self.author_id,
            "lang": self.lang,
            "features": dict(self.features),
        }


@dataclass(frozen=True)
class Interaction:
    member_id: str
    item_id: int
    timestamp: float
    weight: float = 1.0
    action: str = ""  # what the engagement was, in the data's words; "" when the data does not say


@dataclass(frozen=True)
class MemberInfo:
    member_id: str
    profile: Mapping[str, str] = field(default_factory=dict)
    features: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Dataset:
    items: dict[int, Item]
    # Sorted by (timestamp, member_id, item_id): time splits are slices.
    interactions: list[Interaction]
    members: dict[str, MemberInfo] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def member_ids(self) -> list[str]:
        return sorted({i.member_id for i in self.interactions})


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DatasetError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except ValueError as exc:
        raise DatasetError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(out):
        raise DatasetError(f"{what} must be finite, got {value!r}")
    return out


def _item(obj: Mapping[str, Any], where: str) -> Item:
    try:
        item_id = obj["item_id"]
        text = obj["text"]
        created_at = obj["created_at"]
    except KeyError as exc:
        raise DatasetError(f"{where}: missing field {exc.args[0]!r}") from None
    if isinstance(item_id, bool) or not isinstance(item_id, int) or item_id < 0:
        raise DatasetError(f"{where}: item_id must be a non-negative integer, got {item_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: text must be a non-empty string")
    features = obj.get("features") or {}
    if not isinstance(features, dict):
        raise DatasetError(f"{where}: features must be an object")
    return Item(
        item_id=item_id,
        text=text,
        created_at=_number(created_at, f"{where}: created_at"),
        author_id=str(obj.get("author_id") or ""),
        lang=str(obj.get("lang") or ""),
        features={str(k): _number(v, f"{where}: features.{k}") for k, v in features.items()},
    )


def _jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON: {exc}") from None


def read_dataset(directory: str | Path) -> Dataset:
    """Read and validate a dataset directory; interactions with unknown items are an error."""
    d = Path(directory)
    if not (d / ITEMS).exists() or not (d / INTERACTIONS).exists():
        raise DatasetError(f"{d} is not a dataset: it needs {ITEMS} and {INTERACTIONS}")
    items: dict[int, Item] = {}
    for where, obj in _jsonl(d / ITEMS):
        item = _item(obj, where)
        if item.item_id in items:
            raise DatasetError(f"{where}: duplicate item_id {item.item_id}")
        items[item.item_id] = item

    interactions = []
    with (d / INTERACTIONS).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(INTERACTION_FIELDS[:3]) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{INTERACTIONS}: missing columns {sorted(missing)}")
        for n, row in enumerate(reader, 2):
            where = f"{INTERACTIONS}:{n}"
            try:
                item_id = int(row["item_id"])
            except ValueError:
                raise DatasetError(f"{where}: item_id must be an integer, got {row['item_id']!r}") from None
            if item_id not in items:
                raise DatasetError(f"{where}: item_id {item_id} is not in {ITEMS}")
            member_id = (row["member_id"] or "").strip()
            if not member_id:
                raise DatasetError(f"{where}: member_id is empty")
            weight = _number(row.get("weight") or 1.0, f"{where}: weight")
            action = " ".join((row.get("action") or "").split())  # one line in the prompt
            interactions.append(
                Interaction(member_id, item_id, _number(row["timestamp"], f"{where}: timestamp"), weight, action)
            )
    interactions.sort(key=lambda i: (i.timestamp, i.member_id, i.item_id))

    members: dict[str, MemberInfo] = {}
    if (d / MEMBERS).exists():
        for where, obj in _jsonl(d / MEMBERS):
            if "member_id" not in obj:
                raise DatasetError(f"{where}: missing field 'member_id'")
            members[str(obj["member_id"])] = MemberInfo(
                member_id=str(obj["member_id"]),
                profile={str(k): str(v) for k, v in (obj.get("profile") or {}).items()},
                features={str(k): _number(v, f"{where}: features.{k}") for k, v in (obj.get("features") or {}).items()},
            )
    meta = json.loads((d / META).read_text(encoding="utf-8")) if (d / META).exists() else {}
    return Dataset(items=items, interactions=interactions, members=members, meta=meta)


def write_dataset(
    directory: str | Path,
    items: Sequence[Item],
    interactions: Sequence[Interaction],
    members: Sequence[MemberInfo] = (),
    meta: Mapping[str, Any] | None = None,
) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with (d / ITEMS).open("w", encoding="utf-8") as f:
        for item in sorted(items, key=lambda i: i.item_id):
            f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    with (d / INTERACTIONS).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        # The action column only when some interaction has one: datasets without stay as they were.
        with_action = any(i.action for i in interactions)
        writer.writerow(INTERACTION_FIELDS + (OPTIONAL_INTERACTION_FIELDS if with_action else ()))
        for i in sorted(interactions, key=lambda i: (i.timestamp, i.member_id, i.item_id)):
            row = [i.member_id, i.item_id, _compact(i.timestamp), _compact(i.weight)]
            writer.writerow(row + [i.action] if with_action else row)
    if members:
        with (d / MEMBERS).open("w", encoding="utf-8") as f:
            for m in sorted(members, key=lambda m: m.member_id):
                f.write(json.dumps({"member_id": m.member_id, "profile": dict(m.profile), "features": dict(m.features)}) + "\n")
    if meta:
        (d / META).write_text(json.dumps(dict(meta), indent=1) + "\n", encoding="utf-8")


def _compact(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
