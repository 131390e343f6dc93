"""libpcap's own filter compiler and matcher, through ctypes.

Why not a Python binding: none that is maintained fits. pcapy-ng's ``BPFProgram.filter`` passes
the captured length as the wire length (so ``len > N`` and ``greater``/``less`` are wrong on
sliced packets), gives no libpcap error message when a filter does not compile, and compiles
unoptimised (so its instruction count differs from what tcpdump and the kernel see). Here the
filter is compiled exactly as tcpdump compiles it (``pcap_open_dead`` for the link type,
``pcap_compile`` with optimisation on and ``PCAP_NETMASK_UNKNOWN``), so every decision the
extractor makes is libpcap's.

Matching many packets: one ctypes call per packet costs about a microsecond, which is more than
reading the packet. ``Filter.match_many`` therefore runs libpcap's compiled program over a whole
batch at once with numpy (index/bpfvector.py, imported only then, so that compiling a filter
never loads numpy), one instruction at a time over the packets standing at that instruction
(classic BPF only jumps forward, so one pass over the program suffices; the one exception,
``protochain``'s loop, runs through libpcap per packet). It follows
the semantics of libpcap's ``bpf_filter()`` exactly, including the bounds checks that reject a
packet when a load falls past the captured length; the test suite checks it against
``pcap_offline_filter`` packet for packet. ``match_many(..., engine="libpcap")`` keeps the
per-packet ctypes path for comparison and benchmarks.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .bpf import BPF_K, BPF_RET
from .errors import PcapVaultError

if TYPE_CHECKING:
    import numpy as np

    from .bpfvector import VectorBpf

PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
PCAP_ERRBUF_SIZE = 256

_INSN = struct.Struct("=HBBI")  # struct bpf_insn, host byte order


class FilterError(PcapVaultError):
    """A filter expression libpcap refuses; the message is libpcap's own."""


class _BpfInsn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


def _sonames() -> Iterator[str]:
    """The sonames distributions ship first: ctypes.util.find_library runs ldconfig in a
    subprocess, on the host-query fast path's critical path (docs/BENCHMARKS.md, D9)."""
    yield from ("libpcap.so.0.8", "libpcap.so.1", "libpcap.so")
    import ctypes.util

    found = ctypes.util.find_library("pcap")
    if found:
        yield found


def _load() -> ctypes.CDLL:
    last: OSError | None = None
    for n in _sonames():
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError as e:
            last = e
    else:
        raise PcapVaultError(f"libpcap is not installed ({last}); install libpcap0.8")
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    lib.pcap_compile.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_BpfProgram),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint32,
    ]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_freecode.restype = None
    lib.pcap_offline_filter.argtypes = [
        ctypes.POINTER(_BpfProgram),
        ctypes.POINTER(_PktHdr),
        ctypes.c_char_p,
    ]
    lib.pcap_offline_filter.restype = ctypes.c_int
    lib.bpf_filter.argtypes = [
        ctypes.POINTER(_BpfInsn),
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    lib.bpf_filter.restype = ctypes.c_uint
    return lib


_lib: ctypes.CDLL | None = None
# Before libpcap 1.8 pcap_compile used global parser state; serialising costs nothing here.
_compile_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """The loaded libpcap, loaded on first use so importing this module never fails."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class Filter:
    """A compiled filter for one link type; owns the libpcap program and frees it."""

    def __init__(self, expr: str, linktype: int, snaplen: int, prog: _BpfProgram):
        self.expr = expr
        self.linktype = linktype
        self.snaplen = snaplen
        self._prog = prog
        self._hdr = _PktHdr()
        n = prog.bf_len
        self._raw = ctypes.string_at(prog.bf_insns, n * ctypes.sizeof(_BpfInsn)) if n else b""
        #: The program as (code, jt, jf, k) tuples: what start-up-critical code reads, numpy-free.
        self.program: list[tuple[int, int, int, int]] = list(_INSN.iter_unpack(self._raw))
        self._insns: np.ndarray | None = None
        self._vm: VectorBpf | None = None

    @property
    def insns(self) -> np.ndarray:
        """The program as a numpy structured array (code, jt, jf, k), host byte order."""
        if self._insns is None:
            import numpy as np

            from .bpfvector import INSN_DTYPE

            self._insns = np.frombuffer(self._raw, dtype=INSN_DTYPE).copy()
        return self._insns

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Free the libpcap program (also done when the object is collected)."""
        prog = getattr(self, "_prog", None)
        if prog is not None and _lib is not None:
            _lib.pcap_freecode(ctypes.byref(prog))
        self._prog = None

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.program)

    @property
    def matches_everything(self) -> bool:
        """True for the empty filter, which libpcap compiles to a lone ``ret #snaplen``."""
        return (
            len(self.program) == 1
            and self.program[0][0] == BPF_RET | BPF_K
            and self.program[0][3] != 0
        )

    def kernel_program(self) -> tuple[bytes, int]:
        """The instructions as ``struct sock_filter[]`` bytes and their count.

        Ready for ``struct sock_fprog {len, filter}`` and ``setsockopt(SO_ATTACH_FILTER)``;
        ``struct bpf_insn`` and ``struct sock_filter`` have the same layout.
        """
        return self._raw, len(self.program)

    def _program(self) -> _BpfProgram:
        if self._prog is None:
            raise ValueError("filter is closed")
        return self._prog

    def match(self, data: bytes, wirelen: int | None = None) -> bool:
        """Whether one packet passes, exactly as ``pcap_offline_filter`` decides it.

        `wirelen` is the packet's original length; it defaults to the captured length.
        """
        prog = self._program()
        hdr = self._hdr
        hdr.caplen = len(data)
        hdr.len = len(data) if wirelen is None else wirelen
        return lib().pcap_offline_filter(ctypes.byref(prog), ctypes.byref(hdr), data) != 0

    def match_many(
        self,
        buf: bytes | bytearray | memoryview | np.ndarray,
        offsets: np.ndarray | Sequence[int],
        caplens: np.ndarray | Sequence[int],
        wirelens: np.ndarray | Sequence[int],
        engine: str = "numpy",
    ) -> np.ndarray:
        """Match many packets held in one buffer; returns a bool array.

        `offsets` are the positions of the packet data (not the record headers) in `buf`.
        engine="numpy" runs the program vectorised (fast); "libpcap" calls libpcap's
        ``bpf_filter`` once per packet (the reference).
        """
        import numpy as np

        offs = np.asarray(offsets, dtype=np.int64)
        caps = np.asarray(caplens, dtype=np.int64)
        wires = np.asarray(wirelens, dtype=np.int64)
        if len(offs) == 0:
            return np.zeros(0, dtype=bool)
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        if len(offs) and int((offs + caps).max()) > len(arr):
            raise ValueError("a packet lies outside the buffer")
        if engine == "libpcap":
            return self._match_many_libpcap(arr, offs, caps, wires)
        if engine != "numpy":
            raise ValueError(f"unknown engine {engine!r}")
        if self._vm is None:
            from .bpfvector import VectorBpf

            self._vm = VectorBpf(self.insns)
        if self._vm.loops:
            return self._match_many_libpcap(arr, offs, caps, wires)
        return self._vm.run(arr, offs, caps, wires)

    def _match_many_libpcap(
        self, arr: np.ndarray, offs: np.ndarray, caps: np.ndarray, wires: np.ndarray
    ) -> np.ndarray:
        import numpy as np

        insns = self._program().bf_insns
        f = lib().bpf_filter
        base = arr.ctypes.data
        out = np.fromiter(
            (
                f(insns, base + o, w, c) != 0
                for o, c, w in zip(offs.tolist(), caps.tolist(), wires.tolist(), strict=True)
            ),
            dtype=bool,
            count=len(offs),
        )
        return out


def compile_filter(
    expr: str, linktype: int = 1, snaplen: int = 262144, optimize: bool = True
) -> Filter:
    """Compile `expr` as tcpdump would for `linktype`; raise FilterError with libpcap's message.

    `optimize=False` only checks the expression: libpcap's optimiser is what can take minutes
    on a long filter, its parser is linear."""
    if "\0" in expr:  # C would read the text only up to it: `tcp\0udp` as `tcp`, `\0` as all
        raise FilterError(f"bad filter {expr!r}: a filter has no NUL character")
    L = lib()
    with _compile_lock:
        p = L.pcap_open_dead(linktype, snaplen)
        if not p:
            raise FilterError(f"libpcap cannot open a handle for link type {linktype}")
        try:
            prog = _BpfProgram()
            rc = L.pcap_compile(
                p, ctypes.byref(prog), expr.encode(), int(optimize), PCAP_NETMASK_UNKNOWN
            )
            if rc != 0:
                msg = (L.pcap_geterr(p) or b"").decode(errors="replace")
                raise FilterError(f"bad filter {expr!r}: {msg}")
        finally:
            L.pcap_close(p)
    return Filter(expr, linktype, snaplen, prog)
