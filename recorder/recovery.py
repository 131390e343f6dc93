"""What the recorder does on start so that a crash never needs a human.

A crash leaves at most one file under its temporary name (possibly with a torn last record,
since O_DIRECT writes whole chunks) and some finished files without an index or timeline
links. The complete records are kept and the rest is finished the normal way.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import FormatError, PcapVaultError
from pcapvault.index.pcapfile import parse_global_header, scan_records

log = logging.getLogger("pcapvault.recorder")


def lock_dumpset(ds: DumpSet) -> int:
    """Hold an exclusive lock for the life of the process: one writer per dump set."""
    fd = os.open(ds.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PcapVaultError(
            f"another recorder is already writing to {ds.root}; stop it or choose another -o"
        ) from None
    return fd


def salvage(path: Path) -> tuple[int, int] | None:
    """Cut a leftover pcap back to its complete records; return (first_ns, size) or None."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                hdr = parse_global_header(m[:24], str(path))
            except FormatError:
                return None
            table = scan_records(m, hdr)
        if len(table.ts_ns) == 0:
            return None
        if table.complete_end < size:
            log.warning(
                "%s: dropping %d bytes of a torn last record", path.name,
                size - table.complete_end,
            )
            f.truncate(table.complete_end)
        return int(table.ts_ns[0]), table.complete_end


def adopt_leftovers(ds: DumpSet) -> Iterator[tuple[StoredFile, int]]:
    """Finish what a previous run left; yield the files that still need indexing."""
    for temp in ds.temp_files():
        got = salvage(temp)
        if got is None:
            log.warning("removing %s: it holds no complete packet", temp.name)
            temp.unlink()
            continue
        sf = ds.place(temp, got[0])
        log.warning("recovered %s from an interrupted run", sf.name)
        yield sf, got[1]
    for sf in ds.files():
        linked = (timeline.slot_dir(ds.timeline, sf.slot) / sf.name).is_symlink()
        if not sf.index.exists() or not linked:
            yield sf, sf.pcap.stat().st_size
