"""Recorder counters, reported as a log line every few seconds and as a `key: value` file.

The file is what monitoring scrapes (n2disk writes a similar stats file); it is replaced
atomically so a reader never sees half of it. Writing it is best effort: a full disk or a
vanished directory must never stop the capture it describes.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pcapvault.index.atomicfile import write_atomic
from pcapvault.index.errors import PcapVaultError

log = logging.getLogger("pcapvault.recorder")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class StatsPathError(PcapVaultError):
    """The stats file cannot be created at all (a usage error, refused at start)."""


@dataclass
class CaptureStats:
    interface: str
    timeline: str
    packets_received: int = 0
    packets_dropped: int = 0
    packets_filtered: int = 0
    packets_written: int = 0
    bytes_captured: int = 0
    bytes_written: int = 0
    files_written: int = 0
    files_deleted: int = 0  # for either reason:
    files_deleted_budget: int = 0  # to make room within --disk-limit
    files_deleted_age: int = 0  # older than --max-age
    holds: int = 0  # legal holds in force
    held_full: bool = False  # held files fill the budget: not recording
    packets_held_full: int = 0  # dropped (not written) while held_full
    exec_started: int = 0  # --exec-cmd runs started, failed, killed as too slow, and skipped
    exec_failed: int = 0
    exec_killed: int = 0
    exec_skipped: int = 0
    bytes_on_disk: int = 0
    budget_bytes: int = 0  # the --disk-limit in bytes, for monitoring (npcapserve)
    files_pending_index: int = 0
    bytes_pending_index: int = 0
    indexer_restarts: int = 0
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
            "files_deleted_budget": self.files_deleted_budget,
            "files_deleted_age": self.files_deleted_age,
            "holds": self.holds,
            "held_full": int(self.held_full),
            "packets_held_full": self.packets_held_full,
            "exec_started": self.exec_started,
            "exec_failed": self.exec_failed,
            "exec_killed": self.exec_killed,
            "exec_skipped": self.exec_skipped,
            "bytes_on_disk": self.bytes_on_disk,
            "budget_bytes": self.budget_bytes,
            "files_pending_index": self.files_pending_index,
            "bytes_pending_index": self.bytes_pending_index,
            "indexer_restarts": self.indexer_restarts,
            "first_dumped_epoch": _epoch(self.first_dumped_epoch),
            "last_dumped_epoch": _epoch(self.last_dumped_epoch),
            "timeline_path": self.timeline,
        }

    def line(self) -> str:
        d = self.as_dict()
        backlog = (f" waiting-for-index {d['files_pending_index']} files/"
                   f"{d['bytes_pending_index']} bytes" if self.files_pending_index else "")
        held = (f" NOT RECORDING: held files fill the budget, {self.packets_held_full} packets "
                "dropped" if self.held_full else "")
        deleted = (f" deleted {self.files_deleted_budget} for room/{self.files_deleted_age} "
                   "for age" if self.files_deleted else "")
        return (
            f"received {d['packets_received']} dropped {d['packets_dropped']} "
            f"({d['drop_percent']}%) filtered {d['packets_filtered']} "
            f"written {d['packets_written']} pkts/{d['bytes_written']} bytes "
            f"files {d['files_written']} on-disk {d['bytes_on_disk']} bytes{deleted}{backlog}"
            f"{held}"
        )


class StatsFile:
    """The stats file at `path`, written best effort: each cause of failure is logged once."""

    def __init__(self, path: Path):
        self.path = path
        self.reported: set[str] = set()  # causes of failure already logged

    def check(self, stats: CaptureStats) -> None:
        """First write, at start: a path that cannot be created at all is refused.

        A full disk is no reason to refuse: it may clear, and the budget frees space anyway.
        """
        try:
            self._write(stats)
        except (OSError, PcapVaultError) as e:
            if getattr(e, "errno", None) not in DISK_FULL:
                raise StatsPathError(
                    f"cannot write the stats file {self.path}: {_cause(e)}; choose another "
                    "--stats-file or fix its directory"
                ) from None
            self._failed(e)

    def write(self, stats: CaptureStats) -> bool:
        """Replace the file; on failure log the cause (the first time) and go on."""
        try:
            self._write(stats)
        except (OSError, PcapVaultError) as e:  # a temporary in the way is no reason to stop
            self._failed(e)
            return False
        return True

    def disk_full_reported(self) -> None:
        """The recorder has already said the disk is full: no second message for the file."""
        self.reported.add("disk full")

    def _write(self, stats: CaptureStats) -> None:
        # No sync: the capture loop writes it, and must not wait for a busy disk.
        text = "".join(f"{k}: {v}\n" for k, v in stats.as_dict().items())
        write_atomic(self.path, text.encode(), sync=False)

    def _failed(self, e: OSError | PcapVaultError) -> None:
        cause = _cause(e)
        if cause not in self.reported:
            self.reported.add(cause)
            log.warning("cannot write the stats file %s: %s; capture goes on (not said again "
                        "for this cause)", self.path, cause)


def _cause(e: OSError | PcapVaultError) -> str:
    if isinstance(e, OSError):
        return "disk full" if e.errno in DISK_FULL else e.strerror or str(e)
    return str(e)


def _epoch(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"
