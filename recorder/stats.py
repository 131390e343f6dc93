"""Recorder counters, reported as a log line every few seconds and as a `key: value` file.

The file is what monitoring scrapes (n2disk writes a similar stats file); it is replaced
atomically so a reader never sees half of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stats:
    interface: str
    timeline: str
    packets_received: int = 0
    packets_dropped: int = 0
    packets_filtered: int = 0
    packets_written: int = 0
    bytes_captured: int = 0
    bytes_written: int = 0
    files_written: int = 0
    files_deleted: int = 0
    bytes_on_disk: int = 0
    first_dumped_epoch: float | None = None
    last_dumped_epoch: float | None = None
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, object]:
        seen = self.packets_received + self.packets_dropped
        return {
            "interface": self.interface,
            "uptime_seconds": round(time.time() - self.started, 1),
            "packets_received": self.packets_received,
            "packets_dropped": self.packets_dropped,
            "drop_percent": round(100 * self.packets_dropped / seen, 3) if seen else 0.0,
            "packets_filtered": self.packets_filtered,
            "packets_written": self.packets_written,
            "bytes_captured": self.bytes_captured,
            "bytes_written": self.bytes_written,
            "files_written": self.files_written,
            "files_deleted": self.files_deleted,
            "bytes_on_disk": self.bytes_on_disk,
            "first_dumped_epoch": _epoch(self.first_dumped_epoch),
            "last_dumped_epoch": _epoch(self.last_dumped_epoch),
            "timeline_path": self.timeline,
        }

    def line(self) -> str:
        d = self.as_dict()
        return (
            f"received {d['packets_received']} dropped {d['packets_dropped']} "
            f"({d['drop_percent']}%) filtered {d['packets_filtered']} "
            f"written {d['packets_written']} pkts/{d['bytes_written']} bytes "
            f"files {d['files_written']} on-disk {d['bytes_on_disk']} bytes"
        )

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in self.as_dict().items()))
        os.replace(tmp, path)


def _epoch(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"
