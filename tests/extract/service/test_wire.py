"""The service's wire format on its own: the request round trip, the checks of every field,
and the whole-request deadline of the readers, over real socket pairs."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import pytest

from pcapvault.extract.request import Request
from pcapvault.extract.service import wire


def every_field_set() -> Request:
    return Request(["/var/lib/pcapvault/eth0", "/srv/b"], 10, 20, "host 10.0.0.5", True, 96,
                   1 << 20, 1000, 1 << 30, 500, True, True, "endpoint", "packets", 25)


def test_a_request_travels_whole():
    req = every_field_set()
    assert all(getattr(req, f.name) != f.default for f in dataclasses.fields(Request))
    back = wire.Asked.decode(wire.Asked(req, "secret", shared_memory=True).encode())
    assert back == wire.Asked(req, "secret", True)
    assert "secret" not in repr(back)


def test_the_wire_checks_every_field_of_the_request_and_nothing_else():
    """One declaration: a field added to Request without a check would be refused here."""
    body = json.loads(wire.Asked(every_field_set(), "x").encode())
    assert set(body) - {"version"} == set(wire._FIELDS)


@pytest.mark.parametrize("change, message", [
    ({"snaplen": 0}, "snaplen is out of range"),
    ({"table": "flows"}, "table must be one of conversation, endpoint, port"),
    ({"table": 1}, "table must be one of"),
    ({"table_sort": "time"}, "table_sort must be one of bytes, packets"),
    ({"table_limit": 0}, "table_limit is out of range"),
    ({"snaplen": True}, "snaplen must be an integer"),
    ({"filter": 5}, "filter must be a string"),
    ({"filter": "\ud800"}, "filter is not valid Unicode text"),
    ({"dumpsets": []}, "dumpsets must be a non-empty list of paths"),
    ({"dumpsets": ["/a"] * 17}, "dumpsets lists more than 16 dump sets"),
    ({"dumpsets": ["/a\0b"]}, "dumpsets must hold absolute paths"),
    ({"begin_ns": -1}, "begin_ns is out of range"),
    ({"empty": "yes"}, "empty must be true or false"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_each_bad_field_is_named(change, message):
    body = {**json.loads(wire.Asked(every_field_set(), "x").encode()), **change}
    with pytest.raises(wire.ProtocolError) as e:
        wire.Asked.decode(json.dumps(body).encode())
    assert str(e.value).startswith(f"malformed request: {message}")


def test_a_missing_field_is_named():
    body = json.loads(wire.Asked(every_field_set(), "x").encode())
    del body["end_ns"]
    with pytest.raises(wire.ProtocolError, match="missing field 'end_ns'"):
        wire.Asked.decode(json.dumps(body).encode())


def test_the_deadline_covers_the_whole_frame():
    """A peer sending a byte every 50 ms never lets one read time out; the deadline still
    ends the frame at 0.3 s."""
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        for byte in wire.FRAME.pack(wire.REQUEST, 1000) + b"x" * 1000:
            if stop.wait(0.05):
                return
            a.send(bytes([byte]))

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            head = wire.recv_header(b, "request", t0 + 0.3)
            assert head is not None
            wire.recv_exact(b, head[1], "request", t0 + 0.3)
        assert time.monotonic() - t0 < 0.5
    finally:
        stop.set()
        t.join()
        a.close()
        b.close()


def test_a_closed_peer_between_frames_is_not_an_error():
    a, b = socket.socketpair()
    wire.send_json(a, wire.REPLY, {"status": "ok"})
    a.close()
    kind, length = wire.recv_header(b, "reply")
    assert kind == wire.REPLY and wire.recv_json(b, length, 100, "reply") == {"status": "ok"}
    assert wire.recv_header(b, "reply") is None
    b.close()
