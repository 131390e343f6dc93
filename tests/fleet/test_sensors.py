"""A sensor's answer is input (fleet/sensors.py): whatever a URL answers, npcapfleet says
what is wrong with that sensor in one line, and never reads more than MAX_ANSWER bytes.

A real HTTP server on loopback answers as a broken or hostile one might."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pcapvault.fleet import sensors
from pcapvault.fleet.config import Sensor
from pcapvault.fleet.sensors import SensorClient, SensorError

ANSWERS = {
    "/api/v1/status": (200, b"<html>a login page</html>"),
    "/api/v1/catalogue": (200, b"[1, 2, 3]"),
    "/api/v1/conversations": (200, b"x" * (3 << 20)),  # past the test's 1 MB bound
    "/api/v1/pcap": (500, b'{"error": "' + b"e" * (3 << 20) + b'"}'),  # an endless error
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body = ANSWERS[self.path.split("?")[0]]
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


def test_an_endless_answer_is_not_read_to_its_end(client):
    with pytest.raises(SensorError, match="^odd: /api/v1/conversations answered more than 1 MB"):
        client.conversations(0, 10**9, "", [], 10)


def test_an_error_is_read_only_so_far(client):
    with pytest.raises(SensorError, match=r"^odd: /api/v1/pcap answered HTTP 500$"):
        with client.pcapng(0, 10**9, "", []):
            pass
