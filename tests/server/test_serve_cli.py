"""npcapserve's command line refuses what it cannot serve safely: one line, exit 2."""

from __future__ import annotations

import os
import subprocess

import pytest
from recorderproc import tool


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("npcapserve"), *args], capture_output=True, text=True,
                          timeout=60)


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npcapserve: error: "), r.stderr
    for n in needles:
        assert n in lines[0]
    return lines[0]


@pytest.mark.parametrize("listen", ["0.0.0.0", "192.0.2.1", "::", "sensor.example"])
def test_plain_http_only_on_loopback(tmp_path, listen):
    one_line(serve("-t", str(tmp_path), "--listen", listen), 2,
             "plain HTTP only on a loopback address", "--tls-cert")


def test_tls_needs_both_files_and_existing_ones(tmp_path):
    one_line(serve("-t", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")), 2,
             "both --tls-cert and --tls-key")
    one_line(serve("-t", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem"),
                   "--tls-key", str(tmp_path / "k.pem")), 2, "c.pem", "no such file")


def test_config_file_options_and_errors(tmp_path):
    conf = tmp_path / "npcapserve.conf"
    conf.write_text("# the unit's file\n--listen=192.0.2.1\n--frobnicate=1\n")
    one_line(serve(str(conf)), 2, f"{conf}:3", "unknown option '--frobnicate'")
    conf.write_text(f"--listen=192.0.2.1\n-t={tmp_path}\n")
    one_line(serve(str(conf)), 2, "plain HTTP only on a loopback address")


def test_bad_group_filter(tmp_path):
    one_line(serve("-t", str(tmp_path), "--listen", "127.0.0.1",
                   "--group-filter", "nosuchgroup-xyz=tcp"), 2, "no group named")


def test_no_dump_set_configured(tmp_path):
    r = subprocess.run([tool("npcapserve"), "--listen", "127.0.0.1"], capture_output=True,
                       text=True, env={**os.environ, "PCAPVAULT_CONFIG_DIR": str(tmp_path)})
    one_line(r, 2, "no dump set given and none configured")


def test_unusable_pam_service_or_audit_log_stop_the_start(tmp_path):
    base = ["-t", str(tmp_path), "--listen", "127.0.0.1", "--port", "0"]
    r = serve(*base, "--audit-log", str(tmp_path / "no" / "audit.jsonl"))
    one_line(r, 1, "cannot open the audit log")
    r = serve(*base, "--audit-log", str(tmp_path / "audit.jsonl"),
              "--pam-service", "no-such-service-pv")
    one_line(r, 1, "no-such-service-pv")


def test_connections_have_tcp_nodelay():
    """A response is a head and a body: with Nagle's algorithm the body waited for the
    client's delayed ACK of the head (40 ms on every small request). The listening
    socket's connections have TCP_NODELAY, and the protocol asyncio checks before it sets
    it itself."""
    import socket

    from pcapvault.server.cli import bind

    with bind("127.0.0.1", 0) as listener, socket.create_connection(
            listener.getsockname()[:2]) as client:
        conn, _ = listener.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client.close()
