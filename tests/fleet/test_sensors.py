"""A sensor's answer is input (fleet/sensors.py): whatever a URL answers, npcapfleet says
what is wrong with that sensor in one line, and never reads more than MAX_ANSWER bytes.

A real HTTP server on loopback answers as a broken or hostile one might."""

from __future__ import annotations

import socket
import struct
import threading
import time
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


TRICKLE_S = 0.2  # a byte this often: well inside the test client's timeout of 2 s a read
GOOD = SHB + IDB + _epb(0, 1_000_000_000)


def _trickle(out, data: bytes, every: float = TRICKLE_S, parts: int = 0) -> None:
    """Send `data` a byte (or one of `parts` parts) at a time, for 30 s at the most."""
    step = max(len(data) // parts, 1) if parts else 1
    until = time.monotonic() + 30
    for at in range(0, len(data), step):
        if time.monotonic() > until:
            return
        try:
            out.write(data[at:at + step])
            out.flush()
        except OSError:
            return  # the client cut it off: as it should
        time.sleep(every)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path, _, query = self.path.partition("?")
        status, body = ANSWERS[path]
        asked = parse_qs(query).get("dumpset", [""])[0]
        if asked == "slow head":
            return _trickle(self.wfile, b"HTTP/1.1 200 OK\r\n" + b"X-Pad: a\r\n" * 1000)
        if asked in ("slow answer", "slow packet", "slow whole packets"):
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            if asked == "slow answer":
                return _trickle(self.wfile, b'{"files": [' + b" " * 1000 + b"]}")
            if asked == "slow packet":
                self.wfile.write(GOOD)
                return _trickle(self.wfile, _epb(0, 2_000_000_000, bytes(1000)))
            # a legitimate slow stream: a whole packet every 0.6 s, 6 in all
            packets = b"".join(_epb(0, 10**8 * (i + 2)) for i in range(6))
            self.wfile.write(SHB + IDB)
            return _trickle(self.wfile, packets, 0.6, 6)
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
def server():
    s = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    s.daemon_threads = True
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{s.server_port}"
    s.shutdown()
    s.server_close()


@pytest.fixture()
def client(monkeypatch, server):
    monkeypatch.setattr(sensors, "MAX_ANSWER", 1 << 20)
    c = SensorClient(Sensor("odd", server, "t"), 10)
    yield c
    c.close()


@pytest.fixture()
def hasty(server):
    """A client that waits 2 s for a sensor."""
    c = SensorClient(Sensor("slow", server, "t"), 2)
    yield c
    c.close()


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


@pytest.mark.parametrize("what", ["slow head", "slow answer"])
def test_an_answer_trickled_a_byte_at_a_time_is_cut_off(hasty, what):
    """Each byte comes well within the timeout; the answer as a whole does not."""
    t0 = time.monotonic()
    with pytest.raises(SensorError, match=r"^slow: too slow: nothing whole came within 2 s"):
        hasty.catalogue(what, "", 10)
    assert time.monotonic() - t0 < 5


def _pcap(client: SensorClient, asked: str, tmp_path) -> tuple[int, SensorPart, float]:
    part = SensorPart(client, [asked], [0])
    t0 = time.monotonic()
    written = write(str(tmp_path / "out.pcapng"), [Interface("s:eth0", 1, 262144, True)],
                    [part], 0, 10**10, "", lambda p: None)
    return written, part, time.monotonic() - t0


def test_a_packet_trickled_a_byte_at_a_time_ends_that_sensors_part(hasty, tmp_path):
    written, part, took = _pcap(hasty, "slow packet", tmp_path)
    assert written == 1 and took < 5
    assert part.progress.error.startswith("slow: too slow: nothing whole came within 2 s")


def test_a_slow_stream_of_whole_packets_is_not_cut(hasty, tmp_path):
    """A packet every 0.6 s for 3.6 s with a timeout of 2 s: each came in time."""
    written, part, took = _pcap(hasty, "slow whole packets", tmp_path)
    assert part.progress.error is None and written == 6 and took > 3


def test_a_certificate_trickled_a_byte_at_a_time_is_given_up(tmp_path):
    """Fetching a pinned sensor's certificate is bounded as a whole too."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            _trickle(conn.makefile("wb", buffering=0), bytes([22, 3, 3, 0x40, 0]) + bytes(1000))

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SensorError, match="^pinned: cannot fetch the certificate of .*: "
                           "no certificate within 1 s$"):
            sensors.ssl_context(Sensor("pinned", f"https://127.0.0.1:{port}", "t",
                                       fingerprint=bytes(32)), 1)
    finally:
        listener.close()
    assert time.monotonic() - t0 < 5


def test_a_deadline_passed_before_any_connection_does_not_spin():
    """Its watcher waited 0 s in a loop until a connection came: a core, for as long as a
    connect took."""
    d = sensors.Deadline(0.01)
    try:
        d.begin()
        t0 = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - t0 < 0.2
    finally:
        d.close()
