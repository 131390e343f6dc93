"""Running the real `recorder` command in a test namespace and reading back what it wrote."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from pcapvault.index.dumpset import DumpSet

BIN = Path(sys.executable).parent
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tcpdump-tests"


def tool(name: str) -> str:
    """The console script installed next to the running Python (venv or dev install)."""
    p = BIN / name
    return str(p) if p.exists() else name


class RecorderProc:
    """A recorder started in `pair`'s receiving namespace; stderr is collected."""

    def __init__(self, pair, dumpset: Path, *args: str, ready: bool = True):
        self.cmd = [tool("recorder"), "-i", pair.rx, "-o", str(dumpset), *args]
        self.proc = pair.run_rx(*self.cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if ready and not self._ready.wait(20):
            self.stop()
            raise AssertionError("recorder did not start:\n" + self.stderr)

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "recording " in line:
                self._ready.set()
        self._ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            time.sleep(0.05)

    def wait(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)
        return rc


def recorded_frames(dumpset: Path) -> list[tuple[int, bytes, int]]:
    """(timestamp ns, frame, wire length) of every packet in the dump set, in file order."""

    out = []
    for sf in DumpSet.open(dumpset).files():
        out.extend(read_pcap(sf.pcap))
    return out


def read_pcap(path: Path, torn_ok: bool = False) -> list[tuple[int, bytes, int]]:
    """A deliberately separate, minimal pcap decoder: the test must not trust our reader.

    `torn_ok` accepts a partial last record (a crash) and returns the complete ones.
    """
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    assert magic in (0xA1B23C4D, 0xA1B2C3D4), f"{path}: bad magic {magic:#x}"
    mult = 1 if magic == 0xA1B23C4D else 1000
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, frac, caplen, wire = struct.unpack_from("<IIII", data, pos)
        if pos + 16 + caplen > len(data):
            assert torn_ok, f"{path}: torn record at {pos}"
            return out
        out.append((sec * 1_000_000_000 + frac * mult, data[pos + 16 : pos + 16 + caplen], wire))
        pos += 16 + caplen
    assert pos == len(data) or torn_ok, f"{path}: trailing bytes"
    return out


def read_stats(dumpset: Path) -> dict[str, str]:
    """The recorder's `key: value` stats file."""
    return dict(line.split(": ", 1) for line in (dumpset / "stats").read_text().splitlines())


def synthetic_pcap(path: Path, n: int, size: int = 64, vlan: int | None = None) -> None:
    """UDP frames numbered in their payload, optionally 802.1Q-tagged."""
    recs = []
    for i in range(n):
        eth = bytes.fromhex("020000000002020000000001")
        if vlan is not None:
            eth += struct.pack("!HH", 0x8100, vlan)
        payload = struct.pack("!I", i).ljust(max(0, size - 42), b"\xab")
        udp = struct.pack("!HHHH", 4000 + i % 7, 5000, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        frame = eth + b"\x08\x00" + ip + udp
        recs.append(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + b"".join(recs))


def record(veth, tmp_path: Path, count: int, size: int, *args: str) -> list[bytes]:
    """Record `count` synthetic frames into tmp_path/ds with `recorder ARGS`; return them."""
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, count, size)
    rec = RecorderProc(veth, tmp_path / "ds", *args, "--disk-limit", "1GB")
    sent = veth.send([src])
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    return sent


def one_line(r: subprocess.CompletedProcess, code: int | None, *needles: str,
             prog: str | None = None) -> str:
    """The one line a tool's failure prints: exit `code` (None: any but 0), no traceback,
    every needle in it (and `PROG: error: ` first when `prog` is given)."""
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    if code is None:
        assert r.returncode != 0, err
    else:
        assert r.returncode == code, (r.returncode, r.stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    if prog is not None:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def extracted_records(root: Path, out: Path, begin: str, end: str, expr: str = "") -> list:
    """The records npcapextract writes for the window and filter (none when nothing
    matched)."""
    from extract_helpers import read_pcap_records

    r = subprocess.run([tool("npcapextract"), "-t", str(root), "-b", begin, "-e", end, "-o",
                        str(out), *(["-f", expr] if expr else [])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1: nothing matched
    return read_pcap_records(out.read_bytes()) if out.exists() else []
