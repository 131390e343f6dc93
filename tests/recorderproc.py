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
    from pcapvault.index.dumpset import DumpSet

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
