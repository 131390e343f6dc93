"""Which address postings of an index (index/postings.py) can hold a filter's packets, read off
libpcap's compiled program, and which of them the program accepts without looking further.

Why not flowmatch.py: its abstract execution over flow rows is vectorised with numpy, and the
host-query fast path exists to answer before numpy could even be imported. What the fast path
needs is much narrower, and classic BPF makes it cheap: programs only jump forward, so the
paths through a host filter's few dozen instructions can be walked one by one in pure Python.

Along a path we remember, for each absolute load (size, offset), the value a `jeq` proved it
equal to on its true edge and the values it was proved different from on false edges (that is
all a filter on addresses compares). The filter text is never looked at.

* **Keys.** On every accepting path the program proved the Ethernet type (the half-word at 12)
  and an address (IPv4 source or destination word, ARP/RARP sender or target word, or all four
  words of an IPv6 address) equal to constants. A packet that takes that path is therefore an
  untagged frame of that type with that address: it sits in the posting list of (address,
  type), or in the type's "address unknown" list when the index could not record the address.
  If some accepting path proves no such pair, the fast path does not apply.
* **Decisions.** For the packets of one list with given roles (the key is the source and/or the
  destination), the walk starts from what the list proves (the type, and the address equal or
  different in each role) and the bytes the index guarantees were captured. YES when every
  feasible path accepts, NO when every one rejects, MAYBE otherwise (libpcap then decides the
  packet itself). A load past the guaranteed bytes, an indirect load, arithmetic or a comparison
  with an unknown value make the outcome depend on the packet: both branches are followed.
"""

from __future__ import annotations

from collections.abc import Iterator

from pcapvault.index.bpf import (
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_H,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_MISC,
    BPF_RET,
    BPF_TXA,
    BPF_W,
)

NO, YES, MAYBE = 0, 1, 2
ETHERTYPE_AT = (2, 12)
IPV4, ARP, RARP, IPV6 = 0x0800, 0x0806, 0x8035, 0x86DD
# Where libpcap loads the addresses on Ethernet: (source words, destination words) per type.
_ADDRESS_WORDS = {
    IPV4: ((26,), (30,)),
    ARP: ((28,), (38,)),
    RARP: ((28,), (38,)),
    IPV6: ((22, 26, 30, 34), (38, 42, 46, 50)),
}
# Bytes of a frame the index guarantees when it recorded the addresses (FORMAT.md).
CAPTURED_WITH_ADDRESSES = {IPV4: 34, ARP: 42, RARP: 42, IPV6: 54}
MAX_PATHS = 4096  # a host filter has a few dozen; past this the fast path is not for it

_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
_MAPPED = b"\0" * 10 + b"\xff\xff"  # IPv4-mapped IPv6 prefix, the index's address encoding

Load = tuple[int, int]  # (size, offset) of an absolute load
ACCEPT, REJECT, UNKNOWN = "accept", "reject", "unknown"


class _TooMany(Exception):
    pass


def _paths(
    program: list[tuple[int, int, int, int]],
    eq: dict[Load, int],
    ne: dict[Load, frozenset[int]],
    captured: int | None,
) -> Iterator[tuple[str, dict[Load, int]]]:
    """Every feasible path: its outcome and the equalities it proved."""
    count = 0
    stack: list[tuple[int, Load | None, dict[Load, int], dict[Load, frozenset[int]]]] = [
        (0, None, eq, ne)
    ]
    n = len(program)
    while stack:
        pc, a, eq, ne = stack.pop()
        while True:
            if pc >= n:
                yield UNKNOWN, eq  # libpcap never emits this; be safe
                break
            code, jt, jf, k = program[pc]
            cls = code & 7
            if cls == BPF_RET:
                if code & 0x18 == BPF_K:
                    yield (ACCEPT if k else REJECT), eq
                else:
                    yield UNKNOWN, eq
                break
            if cls == BPF_LD:
                size = _SIZES.get(code & 0x18)
                if code & 0xE0 == BPF_ABS and size is not None:
                    a = (size, k)
                    if captured is not None and k + size > captured:
                        # The load may fail (reject) or see anything.
                        count += 1
                        yield UNKNOWN, eq
                        break
                else:
                    a = None
                pc += 1
                continue
            if cls == BPF_JMP:
                op = code & 0xF0
                if op == BPF_JA:
                    pc += 1 + k
                    continue
                t, f = pc + 1 + jt, pc + 1 + jf
                known = eq.get(a) if a is not None else None
                if code & 0x08 != BPF_K or (a is None and known is None):
                    stack.append((f, a, eq, ne))
                    pc = t
                elif known is not None:
                    pc = t if _compare(op, known, k) else f
                elif op == BPF_JEQ:
                    if k in ne.get(a, ()):
                        pc = f
                    else:
                        stack.append((f, a, eq, {**ne, a: ne.get(a, frozenset()) | {k}}))
                        eq = {**eq, a: k}
                        pc = t
                else:  # jgt/jge/jset against a value not known exactly
                    stack.append((f, a, eq, ne))
                    pc = t
                count += 1
                if count > MAX_PATHS:
                    raise _TooMany
                continue
            # Arithmetic and TXA replace A; LDX, ST, STX and TAX leave it as it was.
            if cls == BPF_ALU or (cls == BPF_MISC and code & 0xF8 == BPF_TXA):
                a = None
            pc += 1


def _compare(op: int, value: int, k: int) -> bool:
    if op == BPF_JEQ:
        return value == k
    if op == BPF_JGT:
        return value > k
    if op == BPF_JGE:
        return value >= k
    if op == BPF_JSET:
        return bool(value & k)
    raise ValueError(op)


def _address(eq: dict[Load, int], words: tuple[int, ...]) -> bytes | None:
    if not all((4, w) in eq for w in words):
        return None
    raw = b"".join(eq[(4, w)].to_bytes(4, "big") for w in words)
    return _MAPPED + raw if len(raw) == 4 else raw


def posting_keys(program: list[tuple[int, int, int, int]]) -> set[tuple[bytes, int]] | None:
    """The (16-byte address, ethertype) lists that hold every packet the program can accept on
    Ethernet, or None when some accepting path proves no address."""
    keys: set[tuple[bytes, int]] = set()
    try:
        for outcome, eq in _paths(program, {}, {}, None):
            if outcome == REJECT:
                continue
            if outcome == UNKNOWN:
                return None
            etype = eq.get(ETHERTYPE_AT)
            if etype not in _ADDRESS_WORDS:
                return None
            src, dst = _ADDRESS_WORDS[etype]
            addr = _address(eq, src) or _address(eq, dst)
            if addr is None:
                return None
            keys.add((addr, etype))
    except _TooMany:
        return None
    return keys


def decide(
    program: list[tuple[int, int, int, int]], address: bytes, etype: int, roles: int
) -> int:
    """YES, NO or MAYBE for the packets of list (address, etype) with these role bits (1: the
    address is the source, 2: the destination)."""
    eq: dict[Load, int] = {ETHERTYPE_AT: etype}
    ne: dict[Load, frozenset[int]] = {}
    for role, words in zip((1, 2), _ADDRESS_WORDS[etype], strict=True):
        if roles & role:
            eq.update(((4, w), int.from_bytes(address[-4 * len(words) :][4 * i : 4 * i + 4], "big"))
                      for i, w in enumerate(words))
        elif len(words) == 1:
            ne[(4, words[0])] = frozenset({int.from_bytes(address[-4:], "big")})
    seen = set()
    try:
        for outcome, _ in _paths(program, eq, ne, CAPTURED_WITH_ADDRESSES[etype]):
            seen.add(outcome)
            if UNKNOWN in seen or len(seen) > 1:
                return MAYBE
    except _TooMany:
        return MAYBE
    if seen == {ACCEPT}:
        return YES
    return NO if seen == {REJECT} else MAYBE
