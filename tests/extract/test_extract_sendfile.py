"""Records sent from the source file with sendfile(2) instead of being read and written.

When the output is a pipe or a socket (stdout into another tool, the extraction service's
connection) and takes the records unmodified, the engine leaves long runs of records that need
no filter unread (Batch.buf is None) and the output sends them from the page cache. Only that
path can produce an output from such batches, so every test here checks that some arrived and
that the result is byte for byte the file output's and tcpdump's selection."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    build_dumpset,
    engine_extract,
    read_pcap_records,
    synthetic_traffic,
    tcpdump_select,
)

from pcapvault.extract import engine, output
from pcapvault.extract.output import Batch, FileRuns, Interface, Output
from pcapvault.extract.service import wire
from pcapvault.extract.service.framed import ConnectionOutput
from pcapvault.index.pcapfile import GLOBAL_HEADER_LEN

START = 1763737200 * NS + 123_456_789
WINDOW = (START - NS, START + 3600 * NS)
EXPRS = ["", "tcp", "host 10.0.1.3", "not (host 10.0.1.3 or port 80)", "len > 500"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two dump sets over the same hour: nanosecond and microsecond timestamps."""
    base = tmp_path_factory.mktemp("sendfile")
    ns = build_dumpset(base / "ns", synthetic_traffic(3000, START, seed=5, span_s=3000),
                       per_file=700)
    us = build_dumpset(base / "us", synthetic_traffic(1500, START + 7, seed=6, span_s=3000),
                       per_file=700, nanosecond=False, interface="eth1")
    return (base / "ns", [sf.pcap for sf in ns.files()]), (base / "us", [sf.pcap
                                                                       for sf in us.files()])


@pytest.fixture
def short_runs_too(monkeypatch):
    """Send every run from the file, however short: the test files are small."""
    monkeypatch.setattr(output, "SEND_MIN_RUN", 1)


@pytest.fixture
def seen(monkeypatch) -> dict[str, int]:
    """Counts the batches that reach the output unread, and the bytes sent with sendfile
    (a spy: both paths run as they are)."""
    counts = {"unread": 0, "read": 0, "sent": 0}
    write, send = Output.write, FileRuns.write_to

    def spy_write(self: Output, b: Batch) -> None:
        counts["unread" if b.buf is None else "read"] += len(b)
        write(self, b)

    def spy_send(self: FileRuns, fd: int) -> None:
        counts["sent"] += len(self)
        send(self, fd)

    monkeypatch.setattr(Output, "write", spy_write)
    monkeypatch.setattr(FileRuns, "write_to", spy_send)
    return counts


def run(roots: list[Path], expr: str, make: Callable[[list[Interface]], Output]) -> Output:
    return engine_extract(roots, expr, engine.Query(*WINDOW), make)


def to_file(roots: list[Path], expr: str, path: Path, **caps: int) -> bytes:
    path.unlink(missing_ok=True)
    run(roots, expr, lambda ifaces: Output(str(path), ifaces, **caps))
    return path.read_bytes() if path.is_file() else b""


@contextmanager
def stdout_pipe() -> Iterator[bytearray]:
    """fd 1 is the write end of a pipe while inside; the bytes read from it, once out."""
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    saved = os.dup(1)
    os.dup2(w, 1)
    os.close(w)
    try:
        yield got
    finally:
        os.dup2(saved, 1)  # the pipe's last write end closes: the reader sees the end
        os.close(saved)
        t.join()
        os.close(r)


def to_pipe(roots: list[Path], expr: str, **caps: int) -> bytes:
    with stdout_pipe() as got:
        out = run(roots, expr, lambda ifaces: Output("-", ifaces, **caps))
        assert out.stream
    return bytes(got)


def frames(sock: socket.socket, got: dict) -> None:
    """The client's side of ConnectionOutput: DATA payloads per file, as the client joins them."""
    name = "-"
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf.extend(chunk)
    pos = 0
    while pos < len(buf):
        kind, n = wire.FRAME.unpack_from(buf, pos)
        pos += wire.FRAME.size
        if kind == wire.FILE:
            name = bytes(buf[pos : pos + n]).decode()
        else:
            assert kind == wire.DATA
            got[name] = got.get(name, b"") + bytes(buf[pos : pos + n])
        pos += n


def to_socket(roots: list[Path], expr: str, **caps: int) -> dict[str, bytes]:
    ours, theirs = socket.socketpair()
    got: dict[str, bytes] = {}
    t = threading.Thread(target=frames, args=(theirs, got))
    t.start()
    try:
        run(roots, expr, lambda ifaces: ConnectionOutput(ours, ifaces, **caps))
    finally:
        ours.close()
        t.join()
        theirs.close()
    return got


@pytest.mark.parametrize("expr", EXPRS)
def test_unread_runs_to_a_pipe_equal_the_file_and_tcpdump(sets, tmp_path, seen, expr):
    (root, files), _ = sets
    want = tcpdump_select(files, expr)
    file_out = to_file([root], expr, tmp_path / "o.pcap")
    assert seen["unread"] == 0  # a regular file: everything is read and written as before
    assert read_pcap_records(file_out) == want and want
    seen.update(read=0, sent=0)
    piped = to_pipe([root], expr)
    assert piped == file_out
    if expr == "":  # whole files, one run each: nothing read, everything sent
        assert seen["unread"] > 0 and seen["read"] == 0
        assert seen["sent"] == len(piped) - GLOBAL_HEADER_LEN


@pytest.mark.parametrize("expr", EXPRS)
def test_short_and_confirmed_runs_sent_from_the_file(sets, tmp_path, seen, short_runs_too,
                                                     expr):
    """Runs of records the filter confirmed (read, then sent from the file) and runs of one
    record: the same bytes."""
    (root, files), _ = sets
    file_out = to_file([root], expr, tmp_path / "o.pcap")
    assert to_pipe([root], expr) == file_out
    assert seen["unread"] > 0 or expr  # a filter may leave no chunk that needs no reading
    assert seen["sent"] == len(file_out) - GLOBAL_HEADER_LEN  # every record by sendfile


@pytest.mark.parametrize("expr", ["", "host 10.0.1.3"])
def test_service_frames_carry_the_sent_runs(sets, tmp_path, seen, short_runs_too, expr):
    """The service's connection: a frame header, then the payload sent from the file; split
    files too."""
    (root, _), _ = sets
    file_out = to_file([root], expr, tmp_path / "o.pcap")
    assert to_socket([root], expr) == {"-": file_out}
    assert seen["unread"] > 0 or expr
    assert seen["sent"] == len(file_out) - GLOBAL_HEADER_LEN
    split = tmp_path / "split"
    to_file([root], expr, split, split_packets=20)
    parts = to_socket([root], expr, split_packets=20)
    assert sorted(parts) == sorted(os.listdir(split)) and len(parts) > 2
    assert all(parts[n] == (split / n).read_bytes() for n in parts)


def test_merged_sets_and_caps(sets, tmp_path, seen, short_runs_too):
    """Two dump sets merged in time (the microsecond one is rewritten, so read), with a byte
    cap that cuts a batch."""
    (ns_root, _), (us_root, _) = sets
    roots = [ns_root, us_root]
    for expr in ("", "not udp"):
        for caps in ({}, {"max_bytes": 200_000}, {"max_packets": 1001}):
            file_out = to_file(roots, expr, tmp_path / "o.pcap", **caps)
            assert to_pipe(roots, expr, **caps) == file_out, (expr, caps)
            assert to_socket(roots, expr, **caps) == {"-": file_out}, (expr, caps)
    assert seen["unread"] > 0 and seen["read"] > 0


def test_outputs_refusing_sendfile_get_a_copy(sets, tmp_path):
    """sendfile refuses an O_APPEND output (stdout appended to a file): the runs are copied."""
    (_, files), _ = sets
    src = files[0]
    data = src.read_bytes()
    offsets = np.array([GLOBAL_HEADER_LEN, 1000, 5000], np.int64)
    lengths = np.array([100, 3000, len(data) - 5000], np.int64)
    dst = tmp_path / "appended"
    dst.write_bytes(b"x")
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError):
            os.sendfile(fd_out, fd_in, 0, 1)  # what the copy stands in for
        FileRuns(fd_in, offsets, lengths).write_to(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    want = b"x" + b"".join(data[o : o + n] for o, n in zip(offsets, lengths, strict=True))
    assert dst.read_bytes() == want
