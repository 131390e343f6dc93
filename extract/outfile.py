"""Creating and writing the output: the part of output.py that needs no numpy.

The numpy-free reader of small results (records.py) writes through these same functions, with
the same error messages and the same quiet end when the reader of stdout goes away, without
importing numpy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
from collections.abc import Callable, MutableSequence

from pcapvault.index.errors import PcapVaultError

IOV_MAX = 1024


class OutputError(PcapVaultError):
    """The output cannot be created or written (`errno`: the failed write's, when one)."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


class ClosedPipe(BrokenPipeError):
    """The reader of our stdout went away: stop quietly (tools.cliutil.run exits 0 on it)."""


def is_stream(fd: int) -> bool:
    """A pipe or a socket: where sendfile passes page-cache pages on without copying them."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


# Extracted packets are the data the dump set's permissions and the service's groups gate:
# a new output file is the extracting user's alone (tcpdump -w makes 0644, readable by every
# local user in a shared directory), as is a new -P/-N directory. chmod shares them.
FILE_MODE = 0o600
DIR_MODE = 0o700


def create(name: str) -> int:
    """Open (create or truncate) an output file, as tcpdump -w does, but FILE_MODE."""
    try:
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except OSError as e:
        raise OutputError(f"cannot create {name}: {e.strerror}") from None


def write_error(err: int) -> Exception:
    """The exception for a failed write: a reader that left ends the run quietly."""
    if err == errno.EPIPE:
        return ClosedPipe()
    return OutputError(f"cannot write the output: {os.strerror(err)}", err)


def _writev_loop(lens: MutableSequence[int], submit: Callable[[int, int], int],
                 advance: Callable[[int, int], None]) -> None:
    """The one writev loop: IOV_MAX pieces at a time, continuing after partial writes.

    `lens` are the pieces' lengths; submit(i, k) writes pieces i..k-1 and returns the bytes
    written; advance(j, n) drops the first n bytes of piece j (and of lens[j]), written
    already. The sum over a chunk checks a complete write as fast as numpy would."""
    i, n = 0, len(lens)
    while i < n:
        k = min(n, i + IOV_MAX)
        got = submit(i, k)
        if got == sum(lens[i:k]):
            i = k
            continue
        if got == 0:
            raise OutputError("cannot write the output: nothing was written")
        # Skip the pieces written completely; resume inside a partly written one.
        while got >= lens[i]:
            got -= lens[i]
            i += 1
        if got:
            advance(i, got)


def reader_closed(fd: int) -> bool:
    """Whether nobody reads the pipe `fd` writes into any more (its read end is closed: poll
    reports an error on the write end), without writing to it."""
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))


def writev_all(fd: int, bufs: list) -> None:
    """writev buffers (anything with the buffer protocol), in order."""
    lens = [memoryview(b).nbytes for b in bufs]

    def submit(i: int, k: int) -> int:
        try:
            return os.writev(fd, bufs[i:k])
        except OSError as e:
            raise write_error(e.errno) from None

    def advance(j: int, n: int) -> None:
        bufs[j] = memoryview(bufs[j]).cast("B")[n:]
        lens[j] -= n

    _writev_loop(lens, submit, advance)


_libc_writev = None


def writev_table(fd: int, table) -> None:
    """writev the memory pieces a table of `struct iovec` names: a writable, C-contiguous
    buffer of (address, length) uint64 pairs, left adjusted by partial writes. The caller
    keeps the memory it points into alive. Lets numpy callers write thousands of slices of
    their arrays without a Python object per slice."""
    global _libc_writev
    if _libc_writev is None:
        f = ctypes.CDLL(None, use_errno=True).writev
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        f.restype = ctypes.c_ssize_t
        _libc_writev = f
    flat = memoryview(table).cast("B").cast("Q")
    if not len(flat):
        return
    addr = ctypes.addressof(ctypes.c_uint64.from_buffer(flat))

    def submit(i: int, k: int) -> int:
        while True:
            got = _libc_writev(fd, addr + 16 * i, k - i)
            if got >= 0:
                return got
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise write_error(err)

    def advance(j: int, n: int) -> None:
        flat[2 * j] += n
        flat[2 * j + 1] -= n

    _writev_loop(flat[1::2], submit, advance)
