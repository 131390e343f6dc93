"""Creating and writing the output: the part of output.py that needs no numpy.

The host-query fast path (hostquery.py) writes its result through these same functions, with
the same error messages and the same quiet end when the reader of stdout goes away, without
importing numpy.
"""

from __future__ import annotations

import errno
import os
import stat

from pcapvault.index.errors import PcapVaultError

IOV_MAX = 1024


class OutputError(PcapVaultError):
    """The output cannot be created or written."""


class ClosedPipe(BrokenPipeError):
    """The reader of our stdout went away: stop quietly (tools.cliutil.run exits 0 on it)."""


def is_stream(fd: int) -> bool:
    """A pipe or a socket: where sendfile passes page-cache pages on without copying them."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def create(name: str) -> int:
    """Open (create or truncate) an output file, as tcpdump -w does."""
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create {name}: {e.strerror}") from None


def write_error(err: int) -> Exception:
    """The exception for a failed write: a reader that left ends the run quietly."""
    if err == errno.EPIPE:
        return ClosedPipe()
    return OutputError(f"cannot write the output: {os.strerror(err)}")


def writev_all(fd: int, bufs: list) -> None:
    """writev everything, continuing after partial writes."""
    i = 0
    while i < len(bufs):
        chunk = bufs[i : i + IOV_MAX]
        try:
            n = os.writev(fd, chunk)
        except OSError as e:
            raise write_error(e.errno) from None
        # Skip the buffers written completely; resume inside a partly written one.
        j = i
        while j < i + len(chunk) and n >= len(bufs[j]):
            n -= len(bufs[j])
            j += 1
        if j < i + len(chunk) and n:
            bufs[j] = memoryview(bufs[j])[n:]
        i = j
