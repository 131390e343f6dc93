"""What disk2n replays: frames out of a dump set (through npcapextract's selection engine) or out
of pcap files, in replay order, as chunks of numpy columns pointing into the read buffers.

Every input is opened and checked before the first frame is sent, so a bad path, an
unreadable file, a wrong link type, a bad filter or time fails at once with one line instead of
in the middle of a replay. Files are read through PcapReader, so whatever it learns to open
(compressed pcaps) replays too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcapvault.extract.engine import Query, merge, source_batches
from pcapvault.extract.flowplan import Source, Stats
from pcapvault.index.errors import FormatError, PcapVaultError
from pcapvault.index.libpcap import Filter, compile_filter
from pcapvault.index.pcapfile import MAX_CAPLEN, RECORD_HEADER_LEN, PcapReader, scan_records

DLT_EN10MB = 1
# Frames handed on at a time from a file: bounds the numpy temporaries, not the reads.
CHUNK_FRAMES = 1 << 16

Warn = Callable[[str], None]


class InputError(PcapVaultError):
    """An input cannot be replayed."""


@dataclass
class Frames:
    """Consecutive frames to replay; frame i is buf[off[i] : off[i] + caplen[i]].

    The buffer may be reused by the source for its next chunk: copy what you keep first.
    """

    buf: np.ndarray  # uint8
    off: np.ndarray  # int64
    caplen: np.ndarray  # int64
    ts_ns: np.ndarray  # int64
    origin: str  # file or dump set, for messages
    first: bool  # first chunk of a file or dump-set pass: a new timing segment

    def __len__(self) -> int:
        return len(self.off)

    def take(self, sel: np.ndarray | slice) -> Frames:
        return Frames(self.buf, self.off[sel], self.caplen[sel], self.ts_ns[sel], self.origin,
                      self.first)


def _need_ethernet(linktype: int, what: str) -> None:
    if linktype != DLT_EN10MB:
        raise InputError(
            f"{what}: link type {linktype} is not Ethernet; only Ethernet captures can be "
            "replayed onto an interface"
        )


class FileInput:
    """pcap files played one after the other, each in its stored order.

    Record tables are kept between loops (24 bytes a frame, plus the decompressed bytes of a
    compressed file), so a looped replay does not walk its files again on every pass, which
    would stall the sends at each file start; past CACHE_FRAMES / CACHE_BYTES, files are
    walked again each time.
    """

    CACHE_FRAMES = 1 << 22
    CACHE_BYTES = 256 << 20

    def __init__(self, paths: list[Path], expr: str, warn: Warn):
        self.paths = paths
        self.warn = warn
        for p in paths:
            with PcapReader(p) as r:
                _need_ethernet(r.header.linktype, str(p))
        self.filter: Filter | None = compile_filter(expr, DLT_EN10MB, MAX_CAPLEN) if expr else None
        self._cache: dict[Path, tuple[PcapReader, np.ndarray, np.ndarray, np.ndarray,
                                      np.ndarray]] = {}
        self._frames = self._bytes = 0

    def __iter__(self) -> Iterator[Frames]:
        for path in self.paths:
            yield from self._file(path)

    def close(self) -> None:
        for r, *_ in self._cache.values():
            r.close()
        self._cache.clear()

    def _file(self, path: Path) -> Iterator[Frames]:
        hit = self._cache.get(path)
        if hit is None:
            r = PcapReader(path)
            try:
                hit = (r, *self._read(r, path))
            except BaseException:
                r.close()
                raise
            size = len(hit[1]) if r.compressed else 0
            if (self._frames + len(hit[2]) <= self.CACHE_FRAMES
                    and self._bytes + size <= self.CACHE_BYTES):
                self._cache[path] = hit
                self._frames += len(hit[2])
                self._bytes += size
        r, arr, off, cap, ts = hit
        try:
            for i in range(0, len(off), CHUNK_FRAMES):
                s = slice(i, i + CHUNK_FRAMES)
                yield Frames(arr, off[s], cap[s], ts[s], str(path), i == 0)
        finally:
            if path not in self._cache:
                r.close()

    def _read(self, r: PcapReader, path: Path) -> tuple[np.ndarray, ...]:
        """(file bytes, data offsets, lengths, timestamps) of the frames to replay."""
        _need_ethernet(r.header.linktype, str(path))
        arr = r.array()  # once: a compressed file is decompressed here
        table = scan_records(arr, r.header)
        if table.torn:
            self.warn(f"{path}: truncated after byte {table.complete_end}; replaying the "
                      "complete records")
        rec = table.offset.astype(np.int64)
        cap = table.caplen.astype(np.int64)
        ts = table.ts_ns
        if self.filter is not None and len(rec):
            keep = self.filter.match_many(arr, rec + RECORD_HEADER_LEN, cap,
                                          table.wirelen.astype(np.int64))
            rec, cap, ts = rec[keep], cap[keep], ts[keep]
        return arr, rec + RECORD_HEADER_LEN, cap, ts


class DumpSetInput:
    """The frames of [BEGIN, END) matching FILTER in dump sets, exactly as npcapextract selects
    them (merged in time order across several dump sets)."""

    def __init__(self, paths: list[str], begin_ns: int, end_ns: int, expr: str, warn: Warn):
        self.sources = [Source(p, i, expr) for i, p in enumerate(paths)]
        for s in self.sources:
            _need_ethernet(s.linktype, f"dump set {s.path}")
        self.query = Query(begin_ns, end_ns)
        self.warn = warn
        self.origin = ", ".join(paths)
        self.stats = Stats()

    def close(self) -> None:
        """Nothing is kept open between passes: each pass selects afresh."""

    def __iter__(self) -> Iterator[Frames]:
        single = len(self.sources) == 1
        streams = [source_batches(s, self.query, self.stats, self.warn, lambda: None, single)
                   for s in self.sources]
        batches = streams[0] if single else merge(streams)
        first = True
        for b in batches:
            if len(b):
                yield Frames(b.buf, b.rec + RECORD_HEADER_LEN, b.caplen, b.ts_ns, self.origin,
                             first)
                first = False


def read_playlist(path: Path) -> list[Path]:
    """A playlist: one pcap per line; blank lines and `#` comments ignored; relative paths are
    relative to the playlist, so a directory of captures can carry its own list."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read playlist {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # binary (no path holds a NUL)
        raise InputError(f"{path}: not a text playlist (one pcap path per line)")
    out = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            p = Path(entry)
            out.append(p if p.is_absolute() else path.parent / p)
    if not out:
        raise InputError(f"playlist {path} names no pcap")
    return out


__all__ = ["DumpSetInput", "FileInput", "FormatError", "Frames", "InputError", "read_playlist"]
