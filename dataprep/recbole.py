"""Turn RecBole atomic files (NAME.inter, NAME.item, NAME.user) into the generic training format.

Run:  pip download --no-deps recbole==1.2.1 -d var/dl
      python -m feedret.dataprep.recbole --source var/dl/recbole-1.2.1-py3-none-any.whl \\
          --dataset ml-100k --out var/datasets/ml-100k

`--source` is a directory holding NAME.inter (and NAME.item, optionally NAME.user),
or a wheel/zip read in place: the member `*/dataset_example/NAME/NAME.inter`, or any
member ending in `NAME/NAME.inter`, and its siblings. RecBole itself is not needed.

The atomic format (https://recbole.io/docs/user_guide/data/atomic_files.html) is
tab-separated with a `name:type` header, type one of token, token_seq, float, float_seq.
Each line is decoded as UTF-8, or as latin-1 where it is not UTF-8.

- Interactions: `user_id`, `item_id`, `timestamp` and weight = `rating` (1 when there
  is no such field); `--user-field`, `--item-field`, `--time-field`, `--weight-field`
  rename them. Interactions with an item missing from NAME.item are dropped.
- Items: a token field is a number when it is one in (nearly) every row (`NUMERIC_SHARE`;
  plain numbers only, so codes with leading zeros such as zip codes stay text); those and
  the float fields become `features`, e.g. `release_year`. Token and token_seq fields
  become the text, one short sentence each: `Toy Story (1995). Genres: Animation,
  Children's, Comedy.` (the first field named like a title leads, with the year field in
  brackets). `--text-field NAME` keeps a numeric-looking token field as text,
  `--ignore-field NAME` drops a field (say a float field holding engagement statistics,
  which training computes itself from the training period only); float_seq fields are
  dropped.
- `created_at` is an item's first interaction time: RecBole's datasets carry no
  publication times (ml-100k has only a release year), as in the MovieLens converter.
  Items without interactions are dropped, and so are users without any.
- Members (NAME.user): text fields become `profile` (ml-100k: gender, occupation,
  zip_code), numeric ones `features` (age). Member ids are the RecBole tokens.
- Item ids must be integers >= 0: the RecBole tokens themselves when all are plain
  non-negative integers, otherwise each token's index in sorted order, with
  `item_tokens.csv` mapping them back.

Writes the dataset (feedret.dataprep.format), `dataset.json` naming the source and the
licence, and a NOTICE.md: RecBole redistributes the data, but the original dataset's
licence applies (MovieLens: research use only). Everything is deterministic: items by
id, interactions by (time, member, item), members by id. Bad input ends the command
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import structlog

from feedret.dataprep.format import (
    MEMBERS,
    DatasetError,
    Interaction,
    Item,
    MemberInfo,
    write_dataset,
)

log = structlog.get_logger(__name__)

TYPES = ("token", "token_seq", "float", "float_seq")
SUFFIXES = ("inter", "item", "user")
# A token field is numeric when this share of its non-empty values are plain numbers;
# the rest are left out of the features. ml-100k's release_year has "unkonwn" and "V"
# once each among 1,682 years; its zip codes are 88% plain numbers, so they stay text.
NUMERIC_SHARE = 0.99
# Plain decimal numbers: "01002" (a zip code) is an identifier, not a number.
_PLAIN_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?\Z")
_PLAIN_ID = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_ENDS_WITH_YEAR = re.compile(r"\(\d{4}\)\s*$")
TITLE_HINTS = ("title", "name")
# Field names whose plain form would read oddly in a sentence ("Class: Comedy").
LABELS = {"class": "Genres", "genre": "Genres", "genres": "Genres", "categories": "Categories"}
TOKEN_FILE = "item_tokens.csv"

NOTICE = """\
# Notice: derived from RecBole atomic files of {name}

The files in this directory were derived from the RecBole atomic files of **{name}**
({files}) by `python -m feedret.dataprep.recbole`, read from
{source}:

- each item is a row of {name}.item with at least one interaction: its token and
  token_seq fields as text, its numeric fields as features, and its first interaction
  time as `created_at`;
- each interaction is a row of {name}.inter, with weight = {weight};
- each member is a row of {name}.user with at least one interaction: its text fields
  as profile, its numeric fields as features.

RecBole (MIT licence) redistributes the data but does not relicense it: **the original
dataset's licence applies** to these files and to anything derived from them.
{citation}"""

MOVIELENS_CITATION = """
MovieLens is provided by GroupLens Research, University of Minnesota:
F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4: 19:1–19:19.
<https://doi.org/10.1145/2827872>

These files are for **research use only**, under the GroupLens MovieLens licence (for
ml-100k: <https://files.grouplens.org/datasets/movielens/ml-100k-README.txt>): no
commercial use, no implied endorsement by the University of Minnesota or GroupLens,
acknowledge the dataset in publications, and do not redistribute it without permission.
"""

MOVIELENS_LICENCE = (
    "GroupLens MovieLens licence: research use only, no commercial use, "
    "no redistribution without permission; see NOTICE.md"
)


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # one of TYPES


@dataclass(frozen=True)
class AtomicFile:
    """One atomic file: its header and rows of raw strings, with their line numbers."""

    name: str  # file name, for messages
    fields: tuple[Field, ...]
    rows: tuple[tuple[str, ...], ...]
    lines: tuple[int, ...]

    def column(self, name: str) -> int:
        for i, f in enumerate(self.fields):
            if f.name == name:
                return i
        raise DatasetError(f"{self.name}: no column {name!r} (columns: {', '.join(f.name for f in self.fields)})")

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def values(self, name: str) -> list[str]:
        i = self.column(name)
        return [row[i] for row in self.rows]


@dataclass(frozen=True)
class Columns:
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    weight: str | None = None  # None: "rating" when there is one, else every weight is 1
    text: frozenset[str] = frozenset()  # token fields kept as text even when numeric
    ignore: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Source:
    """Where the atomic files came from, for dataset.json and NOTICE.md."""

    description: str  # e.g. "recbole-1.2.1-py3-none-any.whl (recbole 1.2.1), recbole/dataset_example/ml-100k/"
    package: str = ""
    version: str = ""


@dataclass
class Converted:
    items: list[Item]
    interactions: list[Interaction]
    members: list[MemberInfo]
    item_tokens: dict[int, str]  # empty when item ids are the tokens themselves
    roles: dict[str, dict[str, list[str]]]  # file -> "text"/"features" -> field names
    dropped: dict[str, int] = field(default_factory=dict)
    weight_field: str | None = None  # None: every weight is 1

    @property
    def weight(self) -> str:
        return f"the {self.weight_field} field" if self.weight_field else "1 per interaction (there are no ratings)"


# ---------------------------------------------------------------- reading


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # never fails: ml-100k's titles were latin-1 once


def parse_atomic(name: str, raw_lines: Iterable[bytes]) -> AtomicFile:
    """An atomic file from its raw lines; a bad header or row is a DatasetError naming the line."""
    fields: tuple[Field, ...] = ()
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    for n, raw in enumerate(raw_lines, 1):
        line = _decode(raw).rstrip("\r\n")
        if n == 1:
            fields = _header(name, line.lstrip("\ufeff"))
            continue
        if not line.strip():
            continue
        cells = tuple(c.strip() for c in line.split("\t"))
        if len(cells) != len(fields):
            raise DatasetError(f"{name}:{n}: {len(cells)} tab-separated values, the header has {len(fields)}")
        rows.append(cells)
        lines.append(n)
    if not fields:
        raise DatasetError(f"{name}: empty file (no header)")
    return AtomicFile(name, fields, tuple(rows), tuple(lines))


def _header(name: str, line: str) -> tuple[Field, ...]:
    fields = []
    for cell in line.split("\t"):
        field_name, _, kind = cell.strip().rpartition(":")
        if not field_name or kind not in TYPES:
            raise DatasetError(f"{name}:1: header cell {cell!r} is not name:type with type in {', '.join(TYPES)}")
        fields.append(Field(field_name, kind))
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise DatasetError(f"{name}:1: duplicate column names in the header")
    return tuple(fields)


def _read_dir(directory: Path, name: str) -> tuple[dict[str, AtomicFile], Source]:
    base = directory
    if not (base / f"{name}.inter").exists() and (base / name / f"{name}.inter").exists():
        base = base / name
    files = {}
    for suffix in SUFFIXES:
        path = base / f"{name}.{suffix}"
        if path.exists():
            with path.open("rb") as f:
                files[suffix] = parse_atomic(path.name, f)
    return files, Source(f"{directory.name}/ (RecBole atomic files)")


def _zip_dir(zf: zipfile.ZipFile, zip_name: str, name: str) -> str:
    """The member folder holding NAME.inter: */dataset_example/NAME/ preferred."""
    tail = f"{name}/{name}.inter"
    found = sorted(m for m in zf.namelist() if m == tail or m.endswith("/" + tail))
    preferred = [m for m in found if m.endswith(f"dataset_example/{tail}")]
    found = preferred or found
    if not found:
        raise DatasetError(f"{zip_name} has no {name}.inter (looked for a member ending in {tail})")
    if len(found) > 1:
        raise DatasetError(f"{zip_name} has {len(found)} members ending in {tail}: {', '.join(found)}")
    return found[0][: -len(f"{name}.inter")]


def _dist_info(zf: zipfile.ZipFile) -> tuple[str, str]:
    """(package, version) from a wheel's METADATA; ("", "") for a plain zip."""
    for member in sorted(zf.namelist()):
        if re.fullmatch(r"[^/]+\.dist-info/METADATA", member):
            meta = _decode(zf.read(member))
            name = re.search(r"^Name:\s*(\S+)", meta, re.M)
            version = re.search(r"^Version:\s*(\S+)", meta, re.M)
            return (name.group(1) if name else "", version.group(1) if version else "")
    return "", ""


def _read_zip(path: Path, name: str) -> tuple[dict[str, AtomicFile], Source]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DatasetError(f"{path}: not a zip or wheel file") from None
    with zf:
        folder = _zip_dir(zf, path.name, name)
        members = set(zf.namelist())
        files = {}
        for suffix in SUFFIXES:
            member = f"{folder}{name}.{suffix}"
            if member in members:
                with zf.open(member) as f:
                    files[suffix] = parse_atomic(f"{name}.{suffix}", f)
        package, version = _dist_info(zf)
    described = f"{path.name} ({package} {version}), {folder}" if package else f"{path.name}, {folder}"
    return files, Source(described, package, version)


def read_source(source: Path, name: str) -> tuple[dict[str, AtomicFile], Source]:
    """NAME's atomic files by suffix ("inter", "item", optionally "user") from a directory or zip."""
    if source.is_dir():
        files, where = _read_dir(source, name)
    elif source.is_file():
        files, where = _read_zip(source, name)
    else:
        raise DatasetError(f"{source}: no such directory or wheel/zip file")
    for suffix in ("inter", "item"):
        if suffix not in files:
            raise DatasetError(f"{source}: {name}.{suffix} not found (a dataset needs {name}.inter and {name}.item)")
    return files, where


# ---------------------------------------------------------------- fields


def is_plain_number(value: str) -> bool:
    return bool(_PLAIN_NUMBER.match(value))


def numeric_token(values: Sequence[str]) -> bool:
    """Whether a token field holds numbers: NUMERIC_SHARE of its non-empty values are plain numbers."""
    present = [v for v in values if v]
    if not present:
        return False
    return sum(map(is_plain_number, present)) >= NUMERIC_SHARE * len(present)


def field_roles(f: AtomicFile, id_field: str, columns: Columns) -> dict[str, str]:
    """Each non-id field's role: "text", "number" or "skip"."""
    roles = {}
    for fld in f.fields:
        if fld.name == id_field:
            continue
        if fld.name in columns.ignore or fld.type == "float_seq":
            roles[fld.name] = "skip"
        elif fld.name in columns.text or fld.type == "token_seq":
            roles[fld.name] = "text"
        elif fld.type == "float":
            roles[fld.name] = "number"
        else:
            roles[fld.name] = "number" if numeric_token(f.values(fld.name)) else "text"
    return roles


def _float(value: str, where: str, what: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise DatasetError(f"{where}: {what} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise DatasetError(f"{where}: {what} must be finite, got {value!r}")
    return out


def _features(
    f: AtomicFile, row: Sequence[str], n: int, roles: Mapping[str, str], unread: Counter[str]
) -> dict[str, float]:
    out = {}
    for i, fld in enumerate(f.fields):
        value = row[i]
        if roles.get(fld.name) != "number" or not value:
            continue
        if fld.type == "float":
            out[fld.name] = _float(value, f"{f.name}:{n}", fld.name)
        elif is_plain_number(value):
            out[fld.name] = float(value)
        else:
            unread[fld.name] += 1  # e.g. ml-100k's release year "unkonwn"
    return out


def label(field_name: str) -> str:
    return LABELS.get(field_name.lower()) or field_name.replace("_", " ").strip().capitalize()


def _sentence(part: str) -> str:
    return part if part.endswith((".", "!", "?")) else part + "."


def _number_text(x: float) -> str:
    return str(int(x)) if x.is_integer() else f"{x:g}"


def item_text(
    values: Mapping[str, str],
    types: Mapping[str, str],
    text_fields: Sequence[str],
    title_field: str | None,
    year: float | None,
) -> str:
    """The item's text fields as short sentences, the title (with its year) first."""
    parts = []
    if title_field and values.get(title_field):
        title = " ".join(values[title_field].split())
        if year is not None and not _ENDS_WITH_YEAR.search(title):
            title += f" ({_number_text(year)})"
        parts.append(title)
    for name in text_fields:
        if name == title_field or not values.get(name):
            continue
        value = ", ".join(values[name].split()) if types[name] == "token_seq" else " ".join(values[name].split())
        parts.append(f"{label(name)}: {value}")
    return " ".join(_sentence(p) for p in parts)


def profile_text(value: str, kind: str) -> str:
    return ", ".join(value.split()) if kind == "token_seq" else " ".join(value.split())


def item_ids(tokens: Iterable[str]) -> tuple[dict[str, int], bool]:
    """token -> int id, and whether the ids are the tokens themselves (all plain integers >= 0)."""
    tokens = sorted(set(tokens))
    if all(_PLAIN_ID.match(t) for t in tokens):
        return {t: int(t) for t in tokens}, True
    return {t: i for i, t in enumerate(tokens)}, False


# ---------------------------------------------------------------- converting


def _find(fields: Sequence[str], hints: Sequence[str]) -> str | None:
    return next((n for n in fields if any(h in n.lower() for h in hints)), None)


def convert_files(files: Mapping[str, AtomicFile], columns: Columns = Columns(), lang: str = "") -> Converted:
    """The generic dataset from parsed atomic files (no I/O)."""
    inter, item_file, user_file = files["inter"], files["item"], files.get("user")
    dropped: Counter[str] = Counter(
        {"interactions_with_unknown_items": 0, "items_without_interactions": 0, "users_without_interactions": 0}
    )

    # Interactions.
    ui, ii, ti = inter.column(columns.user), inter.column(columns.item), inter.column(columns.time)
    weight_field = columns.weight or ("rating" if inter.has("rating") else None)
    wi = inter.column(weight_field) if weight_field else None
    item_file.column(columns.item)  # required: a clear message when it is missing
    known_items = set(item_file.values(columns.item))
    raw: list[tuple[str, str, float, float]] = []
    for row, n in zip(inter.rows, inter.lines):
        where = f"{inter.name}:{n}"
        user, token = row[ui], row[ii]
        if not user or not token:
            raise DatasetError(f"{where}: empty {columns.user if not user else columns.item}")
        timestamp = _float(row[ti], where, columns.time)
        weight = _float(row[wi], where, weight_field) if wi is not None else 1.0
        if token not in known_items:
            dropped["interactions_with_unknown_items"] += 1
            continue
        raw.append((user, token, timestamp, weight))

    first_seen: dict[str, float] = {}
    for _, token, timestamp, _ in raw:
        first_seen[token] = min(first_seen.get(token, timestamp), timestamp)
    ids, identity = item_ids(first_seen)

    # Items.
    roles = field_roles(item_file, columns.item, columns)
    types = {f.name: f.type for f in item_file.fields}
    text_fields = [n for n, r in roles.items() if r == "text"]
    number_fields = [n for n, r in roles.items() if r == "number"]
    title_field = _find(text_fields, TITLE_HINTS)
    year_field = _find(number_fields, ("year",)) if title_field else None
    idi = item_file.column(columns.item)
    unread: Counter[str] = Counter()
    items: dict[int, Item] = {}
    for row, n in zip(item_file.rows, item_file.lines):
        token = row[idi]
        if not token:
            raise DatasetError(f"{item_file.name}:{n}: empty {columns.item}")
        if token not in first_seen:
            dropped["items_without_interactions"] += 1
            continue
        if ids[token] in items:
            raise DatasetError(f"{item_file.name}:{n}: duplicate {columns.item} {token!r}")
        features = _features(item_file, row, n, roles, unread)
        text = item_text(dict(zip(types, row)), types, text_fields, title_field, features.get(year_field or ""))
        if not text:
            dropped["items_without_text_named_by_id"] += 1
            text = f"Item {token}."
        items[ids[token]] = Item(ids[token], text, first_seen[token], lang=lang, features=features)

    interactions = [Interaction(user, ids[token], timestamp, weight) for user, token, timestamp, weight in raw]

    # Members.
    members: list[MemberInfo] = []
    user_roles: dict[str, str] = {}
    if user_file is not None:
        active = {user for user, *_ in raw}
        udi = user_file.column(columns.user)
        user_roles = field_roles(user_file, columns.user, columns)
        seen: set[str] = set()
        for row, n in zip(user_file.rows, user_file.lines):
            user = row[udi]
            if not user:
                raise DatasetError(f"{user_file.name}:{n}: empty {columns.user}")
            if user in seen:
                raise DatasetError(f"{user_file.name}:{n}: duplicate {columns.user} {user!r}")
            seen.add(user)
            if user not in active:
                dropped["users_without_interactions"] += 1
                continue
            profile = {
                f.name: profile_text(row[i], f.type)
                for i, f in enumerate(user_file.fields)
                if user_roles.get(f.name) == "text" and row[i]
            }
            members.append(MemberInfo(user, profile, _features(user_file, row, n, user_roles, unread)))

    for name, count in sorted(unread.items()):
        log.info("values_not_numbers_left_out", field=name, count=count)
    return Converted(
        items=[items[i] for i in sorted(items)],
        interactions=sorted(interactions, key=lambda i: (i.timestamp, i.member_id, i.item_id)),
        members=sorted(members, key=lambda m: m.member_id),
        item_tokens={} if identity else {i: t for t, i in sorted(ids.items(), key=lambda kv: kv[1])},
        roles={
            "item": {"text": text_fields, "features": number_fields},
            "user": {
                "profile": [n for n, r in user_roles.items() if r == "text"],
                "features": [n for n, r in user_roles.items() if r == "number"],
            },
        },
        dropped=dict(sorted(dropped.items())),
        weight_field=weight_field,
    )


# ---------------------------------------------------------------- writing


def licence(name: str) -> str:
    if name.lower().startswith("ml-"):
        return MOVIELENS_LICENCE
    return f"the original {name} dataset's licence applies; see NOTICE.md"


def convert(
    source: Path, name: str, out: Path, columns: Columns = Columns(), lang: str = ""
) -> Converted:
    """Read NAME's atomic files from `source` and write the generic dataset to `out`."""
    files, where = read_source(source, name)
    result = convert_files(files, columns, lang)
    if not result.items:
        raise DatasetError(f"{files['inter'].name}: no interactions with an item of {files['item'].name}")

    meta = {
        "name": name,
        "source": f"RecBole atomic files of {name}: {where.description}",
        "licence": licence(name),
        "converter": "feedret.dataprep.recbole",
        "weight": result.weight,
        "created_at": "each item's first interaction time (the data has no publication times)",
        "item_ids": "the RecBole item tokens" if not result.item_tokens
        else f"index of the RecBole item token in sorted order; {TOKEN_FILE} maps them back",
        "fields": result.roles,
        "dropped": result.dropped,
    }
    if where.version:
        meta[f"{where.package}_version"] = where.version
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MEMBERS, TOKEN_FILE):  # from an earlier conversion into the same folder
        (out / stale).unlink(missing_ok=True)
    write_dataset(out, result.items, result.interactions, result.members, meta)
    if result.item_tokens:
        with (out / TOKEN_FILE).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["item_id", "token"])
            writer.writerows(sorted(result.item_tokens.items()))
    (out / "NOTICE.md").write_text(
        NOTICE.format(
            name=name,
            files=", ".join(f"`{f.name}`" for f in files.values()),
            source=where.description,
            weight=result.weight,
            citation=MOVIELENS_CITATION if name.lower().startswith("ml-") else "",
        ),
        encoding="utf-8",
    )
    log.info(
        "dataset_written", out=str(out), items=len(result.items), interactions=len(result.interactions),
        members=len(result.members), **result.dropped,
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="directory holding NAME.inter etc., or a wheel/zip (e.g. recbole-1.2.1-py3-none-any.whl)")
    parser.add_argument("--dataset", required=True, help="the atomic files' name, e.g. ml-100k")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--user-field", default="user_id")
    parser.add_argument("--item-field", default="item_id")
    parser.add_argument("--time-field", default="timestamp")
    parser.add_argument("--weight-field", default=None, help="default: rating when there is one, else weight 1")
    parser.add_argument("--text-field", action="append", default=[],
                        help="a token field to keep as text even when it holds numbers (repeatable)")
    parser.add_argument("--ignore-field", action="append", default=[], help="a field to leave out (repeatable)")
    parser.add_argument("--lang", default="", help="language of the item texts, e.g. en (default: none)")
    args = parser.parse_args(argv)
    columns = Columns(
        user=args.user_field, item=args.item_field, time=args.time_field, weight=args.weight_field,
        text=frozenset(args.text_field), ignore=frozenset(args.ignore_field),
    )
    try:
        convert(args.source, args.dataset, args.out, columns, args.lang)
    except (DatasetError, OSError) as exc:
        print(f"feedret.dataprep.recbole: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
