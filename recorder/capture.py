"""The recorder's main loop: ring blocks in, rotating pcap files out.

Work is per ring block: a retired block becomes one buffer of pcap records and one write.
Packets are looked at individually only in the block that crosses a file boundary (time, slot
or size), which happens once per file.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcapvault.index import privileges, timeline
from pcapvault.index.dumpset import DumpSet, refuse_nested
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.pcapfile import global_header
from pcapvault.index.repair import repair

from .budget import DiskBudget, Limit
from .hook import FileHook
from .indexer import BackgroundIndexer, IndexerFailed
from .ring import BlockRecords, PacketRing, block_to_records
from .stats import CaptureStats, StatsFile
from .writer import DiskFullError, PcapFileWriter

log = logging.getLogger("pcapvault.recorder")
_TS = struct.Struct("<II")
SYNC_SECONDS = 1.0
# --max-age is checked this often (and at start); a full dump set of held files looks for room
# again every HELD_RETRY_SECONDS.
AGE_CHECK_SECONDS = 60.0
HELD_RETRY_SECONDS = 1.0


class HookAsRoot(PcapVaultError):
    """--exec-cmd would run as root (a usage error: give -u)."""


@dataclass
class RecorderConfig:
    interface: str
    dumpset: Path
    timeline: Path | None = None
    buffer_mb: int = 128
    snaplen: int = 1536
    promisc: bool = True
    bpf: str = ""
    max_file_bytes: int = 256 << 20
    max_file_seconds: int = 600
    disk_limit: Limit | None = None
    nanosecond: bool = True
    direct_io: bool = True
    stats_interval: float = 10.0
    stats_file: Path | None = None
    files_per_dir: int = 1000
    user: str | None = None
    file_mode: int = 0o640
    dir_mode: int = 0o750
    compress: int | None = None  # zstd level, or None for plain pcaps
    max_age_ns: int | None = None  # --max-age
    exec_cmd: str | None = None  # --exec-cmd, run for every closed file
    exec_max: int = 2
    exec_timeout: float = 600.0


def split_at(
    secs: list[int], lens: list[int], i: int, end_sec: int, size: int, max_bytes: int,
    has_packets: bool, low_sec: int = 0,
) -> int:
    """First packet from `i` on that belongs in the next file.

    A packet at or after `end_sec` (the slot boundary or the -t limit), one before `low_sec`
    (the clock stepped back: readers find a file's packets from its name's second less one
    only), or one that would take the file past -p starts a new file; a file always takes at
    least one packet, so a packet larger than -p still gets written.
    """
    j = i
    while j < len(secs):
        if secs[j] >= end_sec or secs[j] < low_sec or size + lens[j] > max_bytes:
            if j > i or has_packets:
                break
        size += lens[j]
        j += 1
    return j


class Recorder:
    def __init__(self, cfg: RecorderConfig):
        from pcapvault.index.libpcap import compile_filter

        self.cfg = cfg
        self.usec = not cfg.nanosecond
        prog = compile_filter(cfg.bpf, 1, cfg.snaplen)
        self.ring = PacketRing(
            cfg.interface,
            buffer_mb=cfg.buffer_mb,
            promisc=cfg.promisc,
            kernel_filter=prog.kernel_program(),
        )
        pw = privileges.lookup(cfg.user) if cfg.user else None
        if cfg.exec_cmd and (pw.pw_uid if pw else os.geteuid()) == 0:
            raise HookAsRoot("--exec-cmd would run as root: give -u USER, the account the "
                             "recorder and its command run as")
        # Directories (and markers) get dir_mode through the umask; pcaps and indexes are
        # set to file_mode explicitly.
        os.umask(0o777 & ~cfg.dir_mode)
        refuse_nested(cfg.dumpset)  # before creating anything inside another dump set
        try:
            cfg.dumpset.mkdir(parents=True, exist_ok=True)
            if pw:
                privileges.give_tree(cfg.dumpset, pw)
        except OSError as e:
            raise PcapVaultError(
                f"cannot create output directory {cfg.dumpset}: {e.strerror}; choose another "
                "-o or fix its permissions"
            ) from None
        if pw:
            privileges.drop_to(pw)
        if os.geteuid() != 0:  # root without -u keeps its own (it owns what it writes)
            privileges.drop_capabilities()
        if not os.access(cfg.dumpset, os.W_OK | os.X_OK):
            raise PcapVaultError(
                f"output directory {cfg.dumpset} is not writable; choose another -o or fix "
                "its permissions"
            )
        self.ds = DumpSet.create(
            cfg.dumpset,
            interface=cfg.interface,
            linktype=self.ring.linktype,
            snaplen=cfg.snaplen,
            nanosecond=cfg.nanosecond,
            timeline_dir=cfg.timeline,
            files_per_dir=cfg.files_per_dir,
            file_bytes=cfg.max_file_bytes,
        )
        self.budget = DiskBudget(self.ds, cfg.disk_limit or Limit("80%", percent=80.0),
                                 cfg.max_file_bytes, copies=2 if cfg.compress else 1,
                                 max_age_ns=cfg.max_age_ns)
        self.hook = None
        if cfg.exec_cmd:  # never as root (HookAsRoot), and without capabilities (above)
            self.hook = FileHook(cfg.exec_cmd, self.ds.root, cfg.exec_max, cfg.exec_timeout)
        self.held_full = False  # stopped writing: held files leave no room
        self.header = global_header(self.ring.linktype, cfg.snaplen, cfg.nanosecond)
        self.stats = CaptureStats(cfg.interface, str(self.ds.timeline),
                                  budget_bytes=self.budget.limit_bytes)
        self.stats_file = StatsFile(cfg.stats_file or self.ds.root / "stats")
        self.backlog_reported = False
        self.out: PcapFileWriter | None = None
        self.first_ns = 0
        self.end_sec = 0
        self.low_sec = 0  # a packet before this second starts a new file (see split_at)
        self.file_packets = 0
        self.flush_requested = False
        self.stop_requested = False
        self.inherited_fds: list[int] = []  # e.g. the dump-set lock: not for the indexer
        self.exit_code = 0
        self.indexer: BackgroundIndexer | None = None
        self._rx_base = self._iface_rx()

    # --- signals ----------------------------------------------------------------------------

    def _on_usr1(self, *_: object) -> None:
        self.flush_requested = True

    def _on_stop(self, *_: object) -> None:
        self.stop_requested = True

    # --- files ------------------------------------------------------------------------------

    def _open(self, first_hdr: bytes) -> bool:
        """Start a file with this first packet; False while held files leave no room."""
        if self.held_full:
            return False
        sec, frac = _TS.unpack_from(first_hdr)
        self.first_ns = sec * 1_000_000_000 + frac * (1000 if self.usec else 1)
        self.end_sec = min(
            timeline.slot_of(sec) + timeline.SLOT_SECONDS, sec + self.cfg.max_file_seconds
        )
        self.low_sec = sec - 1
        pending = self.indexer.pending_bytes() if self.indexer else 0
        self._note_backlog(pending)
        self.stats.bytes_on_disk = self.budget.make_room(pending)
        if self.budget.held_full:
            self.held_full = True
            log.error("error: the disk budget is full of files under legal hold: NOT RECORDING "
                      "(packets are dropped and counted) until room appears; release a hold "
                      "(npcapmanage holds, npcapmanage release ID) or raise --disk-limit")
            return False
        self.out = PcapFileWriter(
            self.ds.temp_path(os.getpid()),
            self.header,
            direct=self.cfg.direct_io,
            on_full=self.budget.free_oldest,
            file_mode=self.cfg.file_mode,
        )
        self.file_packets = 0
        return True

    def _retry_held_full(self) -> None:
        """Look for room again (a release, more disk): recording resumes by itself."""
        pending = self.indexer.pending_bytes() if self.indexer else 0
        self.stats.bytes_on_disk = self.budget.make_room(pending)
        if not self.budget.held_full:
            self.held_full = False
            log.warning("room again within the disk budget: recording resumes (%d packets "
                        "were dropped while held files filled it)", self.stats.packets_held_full)

    def _note_backlog(self, pending: int) -> None:
        """Say when the indexer falls behind (and catches up): the budget does not pay for it."""
        behind = self.budget.backlog(pending) > 0
        if behind and not self.backlog_reported:
            log.warning("the indexer is behind: %d closed files (%d bytes) wait for their "
                        "index and are not yet extractable", len(self.indexer.pending), pending)
        elif not behind and self.backlog_reported:
            log.info("the indexer has caught up")
        self.backlog_reported = behind

    def _close(self) -> None:
        out, self.out = self.out, None
        if out is None:
            return
        try:
            size = out.close()
        except DiskFullError:
            size = out.safe_end
            self._finish(out, size)
            raise
        self._finish(out, size)

    def _finish(self, out: PcapFileWriter, size: int) -> None:
        if size <= len(self.header):
            out.path.unlink(missing_ok=True)
            return
        sf = self.ds.place(out.path, self.first_ns)
        self.stats.files_written += 1
        if self.indexer:
            self.indexer.submit(sf, size)
        log.debug("closed %s (%d bytes)", sf.name, size)

    def _store(self, recs: BlockRecords) -> None:
        """Write one block's records, cutting files at time, slot and size boundaries."""
        data, ends, secs = recs
        n = len(ends)
        i = 0
        mx, mn = int(secs.max()), int(secs.min())
        while i < n:
            at = int(ends[i - 1]) if i else 0
            if self.out is None and not self._open(data[at : at + 16]):
                self.stats.packets_held_full += n - i
                return
            size = int(ends[-1]) - at
            if (mx < self.end_sec and mn >= self.low_sec
                    and self.out.size + size <= self.cfg.max_file_bytes):
                self._write(data[at:], n - i, int(secs[i]), int(secs[n - 1]))
                return
            lens = np.diff(ends, prepend=0).tolist()
            j = split_at(secs.tolist(), lens, i, self.end_sec, self.out.size,
                         self.cfg.max_file_bytes, self.file_packets > 0, self.low_sec)
            if j > i:
                self._write(data[at : int(ends[j - 1])], j - i, int(secs[i]), int(secs[j - 1]))
            self._close()
            i = j

    def _write(self, data: bytes, count: int, first_sec: int, last_sec: int) -> None:
        self.out.write(data)
        self.file_packets += count
        self.stats.packets_written += count
        self.stats.bytes_written += len(data)
        self.stats.bytes_captured += len(data) - 16 * count
        if self.stats.first_dumped_epoch is None:
            self.stats.first_dumped_epoch = float(first_sec)
        self.stats.last_dumped_epoch = float(last_sec)

    def _on_block(self, ring, base: int, num: int, off: int) -> None:
        if num:
            self._store(block_to_records(ring, num, off, self.cfg.snaplen, self.usec))

    # --- stats ------------------------------------------------------------------------------

    def _iface_rx(self) -> int | None:
        try:
            with open(f"/sys/class/net/{self.cfg.interface}/statistics/rx_packets") as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _report(self, final: bool = False) -> None:
        rs = self.ring.read_stats()
        self.stats.packets_received = rs.received
        self.stats.packets_dropped = rs.dropped
        rx = self._iface_rx()
        if self.cfg.bpf and rx is not None and self._rx_base is not None:
            seen = rs.received + rs.dropped
            self.stats.packets_filtered = max(0, rx - self._rx_base - seen)
        self.stats.files_deleted = self.budget.deleted_files + self.budget.expired_files
        self.stats.files_deleted_budget = self.budget.deleted_files
        self.stats.files_deleted_age = self.budget.expired_files
        self.stats.held_full = self.held_full
        self.stats.holds = self.budget.held_count()
        if self.hook:
            h = self.hook
            self.stats.exec_started, self.stats.exec_failed = h.started, h.failed
            self.stats.exec_killed, self.stats.exec_skipped = h.killed, h.skipped
        if self.indexer:
            self.stats.bytes_pending_index = self.indexer.pending_bytes()
            self._note_backlog(self.stats.bytes_pending_index)
            self.stats.files_pending_index = len(self.indexer.pending)
            self.stats.indexer_restarts = self.indexer.restarts
        self.stats.bytes_on_disk = self.budget.usage()
        self.stats_file.write(self.stats)
        log.info("%s%s", "final: " if final else "", self.stats.line())

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        self.stats.bytes_on_disk = self.budget.usage()
        self.stats_file.check(self.stats)
        self.indexer = BackgroundIndexer(
            self.ds, self.cfg.file_mode, self.cfg.compress,
            [self.ring.sock.fileno(), *self.inherited_fds], keep_finished=self.hook is not None,
        )
        try:
            for action in repair(self.ds):
                log.warning("repair: %s", action)
            self.budget.keep()  # a damaged holds file is said at once, not at the first delete
            self.budget.expire()
            self.ring.start()
            log.info(
                "recording %s into %s (timeline %s, limit %d bytes)",
                self.cfg.interface, self.ds.root, self.ds.timeline, self.budget.limit_bytes,
            )
            self._loop()
        except DiskFullError as e:
            self._disk_full(e)
        except IndexerFailed as e:
            log.error("error: %s", e)
            self.exit_code = 1
        finally:
            try:
                self._close()
            except DiskFullError as e:
                self._disk_full(e)
            self.indexer.close()
            if self.indexer.failed:
                self.exit_code = 1
            if self.hook:
                self._feed_hook()
                self.hook.close()
            self._report(final=True)
            self.ring.close()
        return self.exit_code

    def _disk_full(self, e: DiskFullError) -> None:
        if not self.exit_code:
            log.error("error: %s", e)
            self.stats_file.disk_full_reported()
        self.exit_code = 1

    def _feed_hook(self) -> None:
        for sf in self.indexer.take_finished():
            self.hook.submit(sf)
        self.hook.poll()

    def _loop(self) -> None:
        next_stats = time.monotonic() + self.cfg.stats_interval
        next_sync = time.monotonic() + SYNC_SECONDS
        next_age = time.monotonic() + AGE_CHECK_SECONDS
        next_held = 0.0
        ring = self.ring
        while not self.stop_requested:
            busy = ring.wait(100)
            self.indexer.check()
            if self.hook:
                self._feed_hook()
            if busy:
                for _ in range(64):
                    if not ring.read_block(self._on_block):
                        break
            now = time.monotonic()
            if self.out is not None and (not busy or now >= next_sync):
                # Bound what a crash can lose to about a second of traffic.
                self.out.flush_aligned()
                next_sync = now + SYNC_SECONDS
            if self.flush_requested:
                self.flush_requested = False
                while ring.read_block(self._on_block):
                    pass
                self._close()
            if self.held_full and now >= next_held:
                next_held = now + HELD_RETRY_SECONDS
                self._retry_held_full()
            if now >= next_age:
                # Between blocks, once a minute: a minute's worth of files at most to delete.
                next_age = now + AGE_CHECK_SECONDS
                self.budget.expire()
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval
                self._report()
        while ring.read_block(self._on_block):
            pass
