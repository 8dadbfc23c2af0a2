"""The README works as written: its CLI commands run against a stack with the output it shows,
and bad input to any `feedret` subcommand is one `Error:` line, never a traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feedret.clients import cli
from feedret.members import MemberProfile

from conftest import free_port, free_port_block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROW = re.compile(r"^\s+\d+\s+\d+\s+-?\d\.\d{4}\s+shard \d+$")


def readme_blocks() -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The "With the stack up" commands (comments stripped), and the example outputs after them."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index("With the stack up"):]
    commands_block = after.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [re.sub(r"\s+#\s.*$", "", line) for line in commands_block.splitlines() if line.strip()]
    rest = after.split("```sh\n", 1)[1].split("```", 1)[1]
    output_block = rest.split("```\n", 1)[1].split("```", 1)[0]
    examples: list[tuple[str, list[str]]] = []
    for line in output_block.splitlines():
        if line.startswith("$ "):
            examples.append((line[2:], []))
        else:
            examples[-1][1].append(line)
    return commands, examples


def run_feedret(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A README line through bash, with this venv's `feedret` entry point first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **env, "PATH": path})


def assert_query_output(out: str, k: int | None = None) -> list[str]:
    lines = out.splitlines()
    m = re.match(r"^(\d+) candidates?, model \S+$", lines[0])
    assert m, out
    assert all(ROW.match(line) for line in lines[1:]), out
    assert int(m.group(1)) == len(lines) - 1
    if k is not None:
        assert len(lines) - 1 == k, out
    return lines


@pytest.mark.e2e
def test_readme_commands_run_as_shown(running_stack):
    commands, examples = readme_blocks()
    assert any(c.startswith("feedret query") for c in commands) and any("publish" in c for c in commands)
    # The README's addresses are `feedret up`'s defaults; the fixture's stack is on free ports.
    env = {"FEEDRET_ROOT_ADDRESS": running_stack.stack.config.root_address,
           "KAFKA_BOOTSTRAP_SERVERS": running_stack.stack.kafka.bootstrap_servers}
    outputs = {}
    for command in commands:
        if command.startswith("feedret lookup"):
            # "exit code 1 until it is indexed (about a second)"
            deadline = time.monotonic() + 30
            while (done := run_feedret(command, env)).returncode == 1 and time.monotonic() < deadline:
                time.sleep(0.2)
        else:
            done = run_feedret(command, env)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        outputs[command] = done.stdout
        if command.startswith("feedret query"):
            k = re.search(r"--k (\d+)", command)
            assert_query_output(done.stdout, int(k.group(1)) if k and "--max-age" not in command else None)
    assert re.match(r"published 1 event to ", next(v for c, v in outputs.items() if "publish" in c))
    assert re.match(r"total indexed: \d+ ", next(v for c, v in outputs.items() if c.startswith("feedret stats")))

    # The example outputs: the same lines, but for what differs between stacks (when a post was
    # indexed; the neighbours of 356 among this fixture's 300 posts rather than all 3,000).
    assert examples
    for command, shown in examples:
        got = run_feedret(command, env)
        assert got.returncode == 0 and "Traceback" not in got.stderr, (command, got.stderr)
        lines = got.stdout.splitlines()
        if command.startswith("feedret lookup"):
            when = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
            assert [when.sub("T", x) for x in lines] == [when.sub("T", x) for x in shown], (command, got.stdout)
        elif "--post-id 356" in command:
            assert lines[:2] == shown[:2] and len(lines) == len(shown), (command, got.stdout)
            assert_query_output(got.stdout)
        else:
            assert lines == shown, (command, got.stdout)


# ---------------------------------------------------------------- bad input: one line, never a traceback


def feedret_main(argv: list[str], capsys, monkeypatch, stdin: str | None = None) -> tuple[int, str, str]:
    """The `feedret` entry point in this process (fast); an exception other than SystemExit fails the test."""
    monkeypatch.setattr(sys, "argv", ["feedret", *argv])
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8"))
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    return exit_.value.code or 0, out, err


def assert_one_error_line(code: int, err: str, argv: list[str]) -> None:
    assert code != 0, argv
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (argv, err)


@pytest.fixture(scope="module")
def closed_root() -> str:
    """An address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("argv, says", [
    (["query", "@no/such/member.json"], "cannot read member file no/such/member.json"),
    (["query", '{"member_id": "m", "recent_activity": "Alien"}'], "recent_activity must be an array"),
    (["query", '{"member_id": "m", "recent_activity": ["Alien"]}'], "recent_activity[0] must be an object"),
    (["query", '{"member_id": "m", "recent_activity": [{"post_id": "7"}]}'], "recent_activity[0].post_id"),
    (["query", '{"member_id": "m", "recent_activity": [{"timestamp": "x"}]}'], "recent_activity[0].timestamp"),
    (["query", '{"member_id": "m", "recent_activity": [{"txt": "x"}]}'], "unknown field 'txt'"),
    (["query", '{"member_id": "m", "features": {"followers": "many"}}'], "features.followers"),
    (["query", '{"member_id": "m", "features": {"followers": NaN}}'], "features.followers"),
    (["query", '{"member_id": "m", "profile": {"age": 30}}'], "profile.age must be a string"),
    (["query", '{"member_id": "m", "profile": "x"}'], "profile must be an object"),
    (["query", '{"member_id": 7}'], "member_id must be a non-empty string"),
    (["query", '{"member_id": "m", "session_id": 1}'], "session_id must be a string"),
    (["query", '{"recent_activity": []}'], "member_id is required"),
    (["query", '{"member_id": "m", "recent_activities": []}'], "unknown field 'recent_activities'"),
    (["query", "[1, 2]"], "must be a JSON object"),
    (["query", "{bad"], "is not valid JSON"),
    (["query", "member.json"], "a file is given as @path"),
    (["query"], "give either MEMBER"),
    (["query", "--post-id", "99999999999999999999999"], "--post-id"),
    (["query", "--post-id", "-1"], "--post-id"),
    (["query", "--post-id", "1", "--exclude", "99999999999999999999999"], "--exclude"),
    (["query", "--post-id", "1", "--k", "x"], "--k"),
    (["query", "--post-id", "1", "--max-age", "-5"], "--max-age"),
    (["query", "--post-id", "1", "--timeout", "nan"], "--timeout"),
    (["query", "--post-id", "1", "--timeout", "0"], "--timeout"),
    (["query", "--post-id", "1", "--root", ""], "--root"),
    (["query", "--post-id", "1", "--root", "{closed}"], "UNAVAILABLE"),
    (["query", '{"member_id": "m"}', "--root", "{closed}"], "UNAVAILABLE"),
    (["lookup", "99999999999999999999999"], "POST_ID"),
    (["lookup", "abc"], "POST_ID"),
    (["lookup", "1", "--root", "{closed}"], "UNAVAILABLE"),
    (["stats", "--root", "{closed}"], "UNAVAILABLE"),
    (["publish", "no/such/posts.jsonl"], "No such file"),
    (["serve", "nothing"], "is not one of"),
    (["nothing"], "No such command"),
])
def test_bad_input_is_one_error_line(argv, says, closed_root, capsys, monkeypatch):
    argv = [a.replace("{closed}", closed_root) for a in argv]
    code, _, err = feedret_main(argv, capsys, monkeypatch)
    assert_one_error_line(code, err, argv)
    assert says in err, err


def test_bad_member_on_stdin_and_undecodable_files(tmp_path, capsys, monkeypatch):
    code, _, err = feedret_main(["query", "-"], capsys, monkeypatch, stdin='{"member_id": "m", "features": []}')
    assert_one_error_line(code, err, ["query", "-"])
    assert "member on stdin: features must be an object" in err
    binary = tmp_path / "posts.bin"
    binary.write_bytes(b'{"post_id": 1}\n\xff\xfe\n')
    for argv in (["publish", str(binary), "--bootstrap", "127.0.0.1:1"], ["query", f"@{binary}"]):
        code, _, err = feedret_main(argv, capsys, monkeypatch)
        assert_one_error_line(code, err, argv)
        assert "is not UTF-8 text" in err


def test_the_shipped_member_file_is_a_valid_member():
    member = MemberProfile.from_json(json.loads((ROOT / "data" / "sample" / "member.json").read_text()))
    assert member.member_id and member.recent_activity and not member.session_id  # edits are never served cached


def test_serve_and_up_refuse_bad_settings_in_one_line(tmp_path):
    """In subprocesses: both configure the process's logging and signal handlers."""
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "feedret.clients.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**os.environ, **(env or {})})

    bad_port = run("serve", "root", env={"FEEDRET_PORT": "abc", "FEEDRET_METRICS_PORT": "0"})
    assert_one_error_line(bad_port.returncode, bad_port.stderr, ["serve", "root"])
    assert "FEEDRET_PORT" in bad_port.stderr

    # A port that is taken (another `feedret up`, say): refused before anything starts.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = free_port_block(4)
        taken = run("up", "--root-port", str(port), "--broker-port", str(base), "--member-port", str(base + 1),
                    "--shard-base-port", str(base + 2), "--metrics-base-port", "0", "--workdir", "w")
    assert_one_error_line(taken.returncode, taken.stderr, ["up"])
    assert f"{port} (root) already in use" in taken.stderr
    assert not (tmp_path / "w" / "logs" / "broker.log").exists()

    bad_posts = tmp_path / "posts.jsonl"
    bad_posts.write_bytes(b"\xff\n")
    undecodable = run("up", "--posts", str(bad_posts), "--workdir", "w")
    assert_one_error_line(undecodable.returncode, undecodable.stderr, ["up", "--posts"])
    bad_members = tmp_path / "members.jsonl"
    bad_members.write_text('{"member_id": "m", "recent_activity": "Alien"}\n')
    members = run("up", "--members", str(bad_members), "--workdir", "w")
    assert_one_error_line(members.returncode, members.stderr, ["up", "--members"])
    assert "line 1: not a member: recent_activity must be an array" in members.stderr
