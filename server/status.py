"""The health of each dump set, for /api/v1/status and /metrics.

Read at request (or scrape) time from what the recorder leaves on disk: its stats file
(recorder/stats.py, `key: value` lines replaced atomically every --stats-interval) and the
dump set itself (its files, their indexes, their sizes). Nothing is cached, so two scrapes
never disagree with the disk, and the server needs no connection to the recorder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pcapvault.extract.access import open_dumpset
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.postings import HEADER_LEN, parse_header
from pcapvault.index.times import format_time

NS = 1_000_000_000
# The recorder rewrites its stats file every --stats-interval (10 s by default): a file
# older than this means the recorder is not running (or cannot write it).
STALE_SECONDS = 60.0


def read_stats(path: Path) -> tuple[dict[str, str], float | None]:
    """The recorder's stats file as a dict, and its modification time (None if absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}, None
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            found[key.strip()] = value.strip()
    return found, mtime


def _int(stats: dict[str, str], key: str) -> int | None:
    try:
        return int(stats[key])
    except (KeyError, ValueError):
        return None


def _last_ns(index: Path) -> int | None:
    """The last packet's time from an index's fixed header (no decompression)."""
    try:
        with open(index, "rb") as f:
            return parse_header(f.read(HEADER_LEN), str(index)).last_ns
    except (OSError, PcapVaultError):
        return None


def dumpset_status(path: str, now: float | None = None) -> dict:
    """One dump set's status; an unusable one gives its path and the error."""
    now = time.time() if now is None else now
    try:
        ds = open_dumpset(path)
        files = ds.files()
        usage = ds.usage()
    except (PcapVaultError, OSError) as e:
        return {"path": path, "error": str(e)}
    stats, mtime = read_stats(ds.root / "stats")
    waiting = 0
    last_indexed: float | None = None
    last_ns: int | None = None
    for sf in reversed(files):
        try:
            st = sf.index.stat()
        except FileNotFoundError:
            waiting += 1
            continue
        if last_indexed is None:
            last_indexed = st.st_mtime
            last_ns = _last_ns(sf.index)
    pending = _int(stats, "files_pending_index")
    first_ns = files[0].first_ns if files else None
    budget = _int(stats, "budget_bytes")
    return {
        "path": str(ds.root),
        "interface": ds.meta.get("interface") or Path(path).name,
        "recorder_up": mtime is not None and now - mtime < STALE_SECONDS,
        "first_packet": format_time(first_ns) if first_ns is not None else None,
        "last_packet": format_time(last_ns) if last_ns is not None else None,
        "oldest_packet_age_s": round(now - first_ns / NS, 3) if first_ns is not None else None,
        "files": len(files),
        "bytes_on_disk": usage,
        "budget_bytes": budget or None,
        "packets_received": _int(stats, "packets_received"),
        "packets_dropped": _int(stats, "packets_dropped"),
        "packets_written": _int(stats, "packets_written"),
        "bytes_written": _int(stats, "bytes_written"),
        # The recorder's count when it runs (it knows what it handed over); the unindexed
        # files on disk otherwise.
        "files_pending_index": pending if pending is not None and mtime is not None
        and now - mtime < STALE_SECONDS else waiting,
        "last_indexed_age_s": round(now - last_indexed, 3) if last_indexed else None,
        "stats_age_s": round(now - mtime, 3) if mtime is not None else None,
    }


# (status key, metric name, help, counter?) for the per-interface metrics.
_METRICS = [
    ("packets_received", "pcapvault_packets_received", "Packets the capture ring received.",
     True),
    ("packets_dropped", "pcapvault_packets_dropped", "Packets the kernel dropped.", True),
    ("packets_written", "pcapvault_packets_written", "Packets written to the dump set.", True),
    ("bytes_written", "pcapvault_bytes_written", "Bytes written to the dump set.", True),
    ("files", "pcapvault_files", "Pcap files in the dump set.", False),
    ("bytes_on_disk", "pcapvault_disk_bytes", "Bytes the dump set takes on disk.", False),
    ("budget_bytes", "pcapvault_disk_budget_bytes", "The dump set's disk budget.", False),
    ("oldest_packet_age_s", "pcapvault_oldest_packet_age_seconds",
     "Age of the oldest packet kept.", False),
    ("last_indexed_age_s", "pcapvault_last_indexed_age_seconds",
     "Seconds since the newest index was written.", False),
    ("files_pending_index", "pcapvault_files_pending_index",
     "Closed files waiting for the indexer.", False),
]


class StatusCollector(Collector):
    """Prometheus metrics of every dump set, read at scrape time."""

    def __init__(self, dumpsets: tuple[str, ...]):
        self.dumpsets = dumpsets

    def collect(self):  # noqa: ANN201 - prometheus-client's interface
        now = time.time()
        found = [dumpset_status(p, now) for p in self.dumpsets]
        labels = ["interface", "dumpset"]
        up = GaugeMetricFamily("pcapvault_recorder_up",
                               "1 while the recorder updates its stats file.", labels=labels)
        families = []
        for key, name, text, counter in _METRICS:
            fam = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text,
                                                                          labels=labels)
            for s in found:
                if s.get(key) is not None:
                    fam.add_metric([s["interface"], s["path"]], s[key])
            families.append(fam)
        for s in found:
            if "error" not in s:
                up.add_metric([s["interface"], s["path"]], 1 if s["recorder_up"] else 0)
        return [up, *families]
