"""How `feedret rollout` and a running `feedret up` talk: a request file, SIGUSR1, a reply in up.json."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from feedret.server import up_control as uc


def state(reply: uc.RolloutReply | None = None) -> uc.UpState:
    return uc.UpState(pid=os.getpid(), root_address="127.0.0.1:1", bootstrap_servers="127.0.0.1:2", generations=[],
                      reply=reply)


def test_a_state_file_without_its_running_feedret_up_is_not_trusted(tmp_path):
    # A killed `feedret up` leaves up.json behind; its pid may be another process's by now.
    uc.write_state(tmp_path, state())
    with pytest.raises(uc.NotRunning, match="is not running"):
        uc.read_state(tmp_path)
    lock = uc.hold_running_lock(tmp_path)
    assert uc.read_state(tmp_path).pid == os.getpid()
    lock.close()
    with pytest.raises(uc.NotRunning):
        uc.read_state(tmp_path)
    with pytest.raises(uc.NotRunning, match="no `feedret up` is running"):
        uc.read_state(tmp_path / "elsewhere")


def test_an_unreadable_request_is_answered_by_its_id_with_the_reason(tmp_path):
    (tmp_path / uc.REQUEST_FILE).write_bytes(b'{"id": "abc", "action": "explode"}')
    taken = uc.take_request(tmp_path)
    assert isinstance(taken, uc.Unreadable) and taken.id == "abc" and "unreadable rollout request" in taken.reason
    (tmp_path / uc.REQUEST_FILE).write_bytes(b"\xff\xfe not json")
    taken = uc.take_request(tmp_path)
    assert isinstance(taken, uc.Unreadable) and taken.id == ""
    assert uc.take_request(tmp_path) is None  # taken means removed


def test_concurrent_commands_each_get_their_own_reply(tmp_path):
    lock = uc.hold_running_lock(tmp_path)
    uc.write_state(tmp_path, state())
    asked = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: asked.set())
    done = threading.Event()

    def feedret_up() -> None:  # answers each request it takes, as `feedret up`'s loop does
        while not done.is_set():
            if asked.wait(0.05):
                asked.clear()
                request = uc.take_request(tmp_path)
                if isinstance(request, uc.RolloutRequest):
                    uc.write_state(tmp_path, state(uc.RolloutReply(id=request.id, ok=True, message=request.action)))

    replies: dict[str, str] = {}
    up = threading.Thread(target=feedret_up)
    up.start()
    try:
        senders = [threading.Thread(target=lambda a=action: replies.__setitem__(
            a, uc.send(tmp_path, uc.RolloutRequest(action=a), timeout=30).message)) for action in ("promote", "abort")]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        assert replies == {"promote": "promote", "abort": "abort"}
    finally:
        done.set()
        up.join(10)
        signal.signal(signal.SIGUSR1, previous)
        lock.close()
    assert json.loads((tmp_path / uc.STATE_FILE).read_text())["reply"]["id"]
