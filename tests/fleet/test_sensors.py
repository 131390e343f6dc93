"""A sensor's answer is input (fleet/sensors.py): whatever a URL answers, npcapfleet says
what is wrong with that sensor in one line, and never reads more than MAX_ANSWER bytes.

A real HTTP server on loopback answers as a broken or hostile one might."""

from __future__ import annotations

import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from pcapvault.extract.output import Interface
from pcapvault.fleet import sensors
from pcapvault.fleet.config import Sensor
from pcapvault.fleet.pcap import SensorPart, write
from pcapvault.fleet.sensors import SensorClient, SensorError

ANSWERS = {
    "/api/v1/status": (200, b"<html>a login page</html>"),
    "/api/v1/catalogue": (200, b"[1, 2, 3]"),
    "/api/v1/conversations": (200, b"x" * (3 << 20)),  # past the test's 1 MB bound
    "/api/v1/pcap": (500, b'{"error": "' + b"e" * (3 << 20) + b'"}'),  # an endless error
}


def _block(btype: int, body: bytes, length: int | None = None) -> bytes:
    body += bytes(-len(body) % 4)
    n = length if length is not None else 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


SHB = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
IDB = _block(1, struct.pack("<HHI", 1, 0, 262144) + struct.pack("<HHB3x", 9, 1, 9) + bytes(4))


def _epb(hi: int, lo: int, frame: bytes = bytes(60)) -> bytes:
    return _block(6, struct.pack("<IIIII", 0, hi, lo, len(frame), len(frame)) + frame)


# What a broken or hostile sensor may stream as its pcapng: one good packet, then this.
# (The test's name for it: the bytes, what the run says of it.)
STREAMS = {
    "short packet block": (struct.pack("<II", 6, 12) + bytes(4), "damaged pcapng block"),
    "option past its block": (_block(1, struct.pack("<HHI", 1, 0, 65535)
                                     + struct.pack("<HH", 9, 8)), "damaged pcapng interface"),
    "time past 2262": (_epb(0xFFFFFFFF, 0), "a packet time past"),
    "block of 4 GB": (struct.pack("<II", 6, 0xFFFFFFF0) + bytes(3 << 20),
                      "damaged pcapng block"),
}


# Catalogue answers Python's json would take, but a sensor's JSON may not hold.
NOT_JSON = {"infinite": b'{"files": [], "first_ns": 1e400}', "nan": b'{"more": NaN}',
            "deep": b"[" * 100_000 + b"]" * 100_000}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, _, query = self.path.partition("?")
        status, body = ANSWERS[path]
        asked = parse_qs(query).get("dumpset", [""])[0]
        if path == "/api/v1/catalogue" and asked in NOT_JSON:
            body = NOT_JSON[asked]
        if path == "/api/v1/pcap" and asked in STREAMS:
            status, body = 200, SHB + IDB + _epb(0, 1_000_000_000) + STREAMS[asked][0]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client stopped reading: as it should

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def client(monkeypatch):
    monkeypatch.setattr(sensors, "MAX_ANSWER", 1 << 20)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c = SensorClient(Sensor("odd", f"http://127.0.0.1:{server.server_port}", "t"), 10)
    yield c
    c.close()
    server.shutdown()
    server.server_close()


def test_what_is_not_a_json_object_is_refused(client):
    with pytest.raises(SensorError, match="^odd: /api/v1/status answered something other"):
        client.dumpsets()
    with pytest.raises(SensorError, match="^odd: /api/v1/catalogue answered something other"):
        client.catalogue("/d", "", 10)


@pytest.mark.parametrize("what", list(NOT_JSON))
def test_json_no_sensor_sends_is_refused(client, what):
    with pytest.raises(SensorError, match="^odd: /api/v1/catalogue answered something other"):
        client.catalogue(what, "", 10)


def test_an_endless_answer_is_not_read_to_its_end(client):
    with pytest.raises(SensorError, match="^odd: /api/v1/conversations answered more than 1 MB"):
        client.conversations(0, 10**9, "", [], 10)


def test_an_error_is_read_only_so_far(client):
    with pytest.raises(SensorError, match=r"^odd: /api/v1/pcap answered HTTP 500$"):
        with client.pcapng(0, 10**9, "", []):
            pass


@pytest.mark.parametrize("damage", list(STREAMS))
def test_a_damaged_pcapng_ends_that_sensors_part_after_its_good_packets(client, tmp_path,
                                                                       damage):
    """The run goes on and says which sensor broke off (a partial result), with the packet
    before the damage written; a block said to be 4 GB is refused, not buffered."""
    part = SensorPart(client, [damage], [0])
    heard = []
    out = tmp_path / "out.pcapng"
    written = write(str(out), [Interface("odd:eth0", 1, 262144, True)], [part], 0, 10**9,
                    "", heard.append)
    assert written == 1 and heard == [part.progress]
    assert part.progress.error.startswith(f"odd: {STREAMS[damage][1]}")
    assert out.stat().st_size > 0
