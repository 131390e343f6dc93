"""npcapextract connects to the extraction service before it imports click (extract/prestart.py).

Real Unix sockets; the clients are fresh interpreters, so what they have imported when they
connect is what the console script has."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pcapvault.extract import prestart
from pcapvault.extract.service import client


class Listener:
    """A Unix socket that accepts and records, standing in for npcapextract.socket."""

    def __init__(self, path: Path, hang_up: bool = False):
        self.path = str(path)
        self.hang_up = hang_up  # close each connection at once, as a refusing service would
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.hang_up:
                conn.close()

    def wait_for(self, n: int) -> None:
        for _ in range(200):
            if len(self.accepted) >= n:
                return
            time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture
def listener(tmp_path):
    lst = Listener(tmp_path / "svc.sock")
    yield lst
    lst.close()


def preconnect_in_fresh_process(args: list[str]) -> list[str]:
    """Run preconnect in a new interpreter, as the console script does: whether it holds a
    connection, and whether click was loaded by then."""
    code = (
        "import sys; from pcapvault.extract import prestart; "
        f"prestart.preconnect({args!r}); "
        "print(len(prestart._held), 'click' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_forced_service_connects_before_click(listener, tmp_path):
    args = ["--service", "--service-socket", listener.path, "-t", str(tmp_path), "-b", "-1h",
            "-e", "now", "-o", "x.pcap"]
    assert preconnect_in_fresh_process(args) == ["1", "False"]
    listener.wait_for(1)
    assert len(listener.accepted) == 1


def test_readable_dump_sets_need_no_connection(listener, tmp_path):
    args = ["--service-socket", listener.path, "-t", str(tmp_path), "-b", "-1h", "-e", "now"]
    assert preconnect_in_fresh_process(args) == ["0", "False"]
    assert listener.accepted == []


def test_no_service_no_connection_no_error(tmp_path):
    """Nobody listening: nothing held; the client's own connect reports it later."""
    args = ["--service", "--service-socket", str(tmp_path / "none.sock")]
    assert preconnect_in_fresh_process(args) == ["0", "False"]


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-t", "/a", "-t/b", "--dumpset", "/c", "--dumpset=/d"],
         {"dumpset": ["/a", "/b", "/c", "/d"]}),
        (["--service", "--service-socket=/s"], {"dumpset": [], "service": ["1"], "socket": ["/s"]}),
        (["--service-socket", "/s", "-f", "tcp", "--", "--service"],
         {"dumpset": [], "socket": ["/s"]}),
        (["-f", "-t", "-t", "/ds"], {"dumpset": ["/ds"]}),  # a filter that reads "-t"
        (["-t"], {"dumpset": []}),
        (["-o", "-t", "-b", "-15m", "-e=now", "--end", "now", "-fhost 10.0.0.1", "-lv"],
         {"dumpset": []}),
    ],
)
def test_arguments_read_as_click_reads_them(argv, want):
    assert prestart._scan(argv) == want


def test_client_takes_the_early_connection(listener):
    """The client's connect() uses the held connection (no second one), still checks that
    root listens: as root here, it does."""
    prestart.preconnect(["--service", "--service-socket", listener.path])
    sock = client.connect(listener.path, False, ("/x",))
    listener.wait_for(2)  # a second connection would show up here
    try:
        assert len(listener.accepted) == 1
        assert prestart.take(listener.path) is None  # taken once
        assert sock.getpeername() == listener.path
    finally:
        sock.close()


def test_python_m_entry_hands_the_connection_to_the_client(tmp_path):
    """`python -m pcapvault.extract` (as the PAM tests run the client): one connection
    for the whole run, not an early one and then the client's own."""
    listener = Listener(tmp_path / "hangup.sock", hang_up=True)
    r = subprocess.run(
        [sys.executable, "-m", "pcapvault.extract", "--service", "--service-socket",
         listener.path, "-t", str(tmp_path), "-b", "-1h", "-e", "now", "-o",
         str(tmp_path / "o.pcap"), "--password-stdin"],
        input=b"secret\n", capture_output=True, timeout=30,
    )
    listener.close()
    assert r.returncode == 2, r.stderr  # the stand-in hangs up without an answer
    assert b"without an answer" in r.stderr
    assert len(listener.accepted) == 1


def test_the_entry_point_connects_before_click_loads():
    """Everything npcapextract's entry point imports before it connects stays light: click
    (about 30 ms) would delay the service instance's start by as much."""
    code = ("import sys; import pcapvault.extract.__main__; "
            "print(sorted(m for m in ('click', 'numpy', 'json') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
