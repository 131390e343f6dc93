"""Per-flow decisions from libpcap's compiled program: which index flow rows can match a filter.

The index keeps, per file, a table of distinct flow rows (VLAN ids, ethertype, IP version, L4
protocol, addresses, ports). To use it we must know, for a row, whether some packet of that flow
could pass the filter. We never parse the filter text: libpcap compiles it, and we run the
compiled BPF program over a *partially known* packet synthesised from the row.

Every byte of the synthetic packet carries a value and a mask of unknown bits (a "tnum", the
same abstraction the Linux eBPF verifier uses). Bits the row fixes are known (the VLAN id in the
TCI, the ethertype, the addresses, the ports, a zero fragment offset); everything else is unknown
(MAC addresses, TTL, TCP flags, payload, the wire length). Bytes past the fields the row proves
were captured may lie beyond the captured length, so reading them is "undetermined" too. The
program is executed abstractly: a branch whose outcome depends on an unknown bit, an indirect
load through an unknown index, or a return of an unknown value makes the variant undetermined.

Layout details the row does not record are enumerated as variants: the IPv4 header length (the
ports sit after the options), the VLAN TPIDs, and whether an IPv6 packet carries extension
headers before its transport header. A row is

  * NO    when every variant certainly fails: no packet of the flow can match, skip it;
  * YES   when every variant certainly passes;
  * MAYBE otherwise: its packets are candidates and libpcap confirms each one.

Rows are first tried with coarse variants (IPv4 header length and IPv6 next header left
unknown), which settle most rows of most filters in one variant; only the rest are enumerated.

For each decided row, one determined outcome is also checked by running the compiled program
concretely (the vectorised matcher of index/libpcap.py, which the tests hold equal to libpcap's
``bpf_filter``) on a concrete member of the variant (all unknown bits zero); a disagreement
demotes the row to MAYBE. So the concrete semantics stay libpcap's and this module only adds
*how much of the packet the answer used*.
"""

from __future__ import annotations

import itertools

import numpy as np

from pcapvault.index import bpf, builder, indexfile
from pcapvault.index.libpcap import Filter

NO, YES, MAYBE = 0, 1, 2

DLT_EN10MB = 1
SYN_LEN = 96  # bytes of synthetic packet: past the ports of a QinQ IPv4 header with options
# What the index builder records decides which packets a row stands for; follow its constants.
VLAN_TPIDS = indexfile.VLAN_TPIDS
VLAN_ABSENT = indexfile.VLAN_ABSENT
VLAN_UNREADABLE = indexfile.VLAN_UNREADABLE
IPV6_EXT = builder.IPV6_EXTENSIONS
F_PORTS, F_FRAG = indexfile.FLAG_PORTS, indexfile.FLAG_FRAGMENT
F_PROTO, F_ADDRS = indexfile.FLAG_PROTO, indexfile.FLAG_ADDRS
ROWS_PER_BLOCK = 2048  # rows expanded at once: bounds memory for QinQ rows (many variants)

U32 = np.uint32
FULL = U32(0xFFFFFFFF)


class _Chunks:
    """Synthetic packets built in bulk: values, unknown-bit masks, bytes surely captured, row,
    and the byte span [start, stop) where the row's addresses sit (0, 0: none recorded)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(
        self, rows: np.ndarray, V: np.ndarray, U: np.ndarray, KL: np.ndarray | int, ok=None,
        addr_span: np.ndarray | None = None,
    ) -> None:
        """Keep the variants still consistent (`ok`), the others describe no real packet."""
        if ok is not None and not ok.any():
            return
        kl = np.broadcast_to(np.asarray(KL, dtype=np.int64), (len(rows),))
        span = np.zeros((len(rows), 2), np.int64) if addr_span is None else addr_span
        if ok is not None:  # a copy even when all are kept: callers go on changing V and U
            rows, V, U, kl, span = rows[ok], V[ok], U[ok], kl[ok], span[ok]
        if len(rows):
            self.parts.append((rows, V, U, kl, span))

    def arrays(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            e = np.zeros((0, SYN_LEN), np.uint8)
            z = np.zeros(0, np.int64)
            return e, e, z, z, np.zeros((0, 2), np.int64)
        rows, V, U, KL, span = (np.concatenate(x) for x in zip(*self.parts, strict=True))
        return V, U, KL, rows, span


def _pick(sel: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The selected rows of each array; no copy when all are selected (the common case)."""
    if sel.all():
        return arrays
    return tuple(a[sel] for a in arrays)


def _addr_span(has: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Per variant, where the addresses of rows that record them lie in the packet."""
    return np.where(has[:, None], np.array([start, stop], np.int64), 0)


def _be16(x: np.ndarray) -> np.ndarray:
    """Column pairs (n, 2) holding `x` big-endian."""
    x = np.asarray(x).astype(np.uint16)
    return np.stack([(x >> 8).astype(np.uint8), (x & 0xFF).astype(np.uint8)], axis=1)


def _know(V: np.ndarray, U: np.ndarray, ok: np.ndarray, off: int, data, unknown=0) -> None:
    """Make bytes off.. known (except the `unknown` bits, per byte) with `data` (n, w).

    A variant in which an already known bit would change is inconsistent (e.g. ports that
    overlap the IPv4 header when IHL < 5): it is flagged in `ok` and later dropped.
    """
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim == 1:
        data = np.broadcast_to(data, (len(V), len(data)))
    w = data.shape[1]
    new = (~np.asarray(unknown, dtype=np.int64) & 0xFF).astype(np.uint8)
    cv, cu = V[:, off : off + w], U[:, off : off + w]
    ok &= ~(((cv ^ data) & ~cu & new) != 0).any(axis=1)
    V[:, off : off + w] = (cv & cu & ~new) | (cv & ~cu) | (data & new)
    U[:, off : off + w] = cu & ~new


def _build_variants(
    flows: np.ndarray, coarse: bool = False, addrs: bool = True
) -> tuple[np.ndarray, ...]:
    """Enumerate the packets each Ethernet flow row stands for (see the module docstring).

    This mirrors what pcapvault.index.builder records: up to four VLAN tags are looked through
    with the first two ids kept (0xFFFE when a TCI is cut off), IPv4 is found by ethertype with
    its transport header at 4 x IHL for any IHL, IPv6 extension headers are walked.

    `coarse` leaves the IPv4 header length and the IPv6 next header unknown instead of
    enumerating them: one variant per row and TPID choice, enough to decide most rows.
    `addrs=False` also leaves the addresses unknown (still captured), so that rows differing
    only in addresses and ports share one decision; the returned spans say where they were.
    """
    out = _Chunks()
    n = len(flows)
    names = ("ethertype", "vlan1", "vlan2", "ipver", "proto", "flags")
    f = {k: flows[k].astype(np.int64) for k in names}
    f["src"] = np.frombuffer(flows["src"].tobytes(), np.uint8).reshape(n, 16)
    f["dst"] = np.frombuffer(flows["dst"].tobytes(), np.uint8).reshape(n, 16)
    f["ports"] = np.concatenate([_be16(flows["sport"]), _be16(flows["dport"])], axis=1)
    p1, p2 = f["vlan1"] != VLAN_ABSENT, f["vlan2"] != VLAN_ABSENT
    layouts = [(~p1 & ~p2, 0, 0), (p1 & ~p2, 1, 0)]
    # Two recorded tags: up to two more may follow whose ids were not recorded.
    layouts += [(p1 & p2, 2, extra) for extra in (0, 1, 2)]
    for sel, ntags, extra in layouts:
        base = np.nonzero(sel)[0]
        if extra:
            base = base[f["ethertype"][base] != 0]
        if not len(base):
            continue
        # Every combination of TPIDs, all at once: rows repeated, one combination each.
        combos = np.array(list(itertools.product(VLAN_TPIDS, repeat=ntags + extra)), np.int64)
        combos = combos.reshape(len(combos), ntags + extra)
        r = np.repeat(base, len(combos))
        tpids = np.tile(combos, (len(base), 1))
        _tagged_variants(out, f, r, tpids, ntags, coarse, addrs)
    return out.arrays()


def _tagged_variants(
    out: _Chunks, f: dict, r: np.ndarray, tpids: np.ndarray, ntags: int, coarse: bool,
    addrs: bool,
) -> None:
    m = len(r)
    V = np.zeros((m, SYN_LEN), np.uint8)
    U = np.full((m, SYN_LEN), 0xFF, np.uint8)
    ok = np.ones(m, bool)
    done = np.zeros(m, bool)  # the row ends inside the tags (TCI cut off)
    for j in range(tpids.shape[1]):
        off = 12 + 4 * j
        _know(V, U, ok, off, _be16(tpids[:, j]))
        if j >= ntags:
            continue  # an extra tag: its TCI is not recorded
        vid = f["vlan1" if j == 0 else "vlan2"][r]
        cut = (vid == VLAN_UNREADABLE) & ~done
        out.add(r, V, U, off + 2, cut & ok)
        done |= cut
        # PCP and DEI are not recorded: the top four bits of the TCI stay unknown.
        _know(V, U, ok, off + 2, _be16(vid & 0xFFF), unknown=(0xF0, 0))
    r, V, U, ok = _pick(~done, r, V, U, ok)
    eoff = 12 + 4 * tpids.shape[1]
    l3 = eoff + 2
    et = f["ethertype"][r]
    short = et == 0  # 0 also means "frame too short": nothing after the tags is known
    out.add(r, V, U, eoff, short & ok)
    r, V, U, ok, et = _pick(~short, r, V, U, ok, et)
    _know(V, U, ok, eoff, _be16(et))
    ipver = f["ipver"][r]
    v4 = (ipver == 4) & (et == 0x0800)
    v6 = (ipver == 6) & (et == 0x86DD)
    arp = (et == indexfile.ETHERTYPE_ARP) | (et == indexfile.ETHERTYPE_RARP)
    other = ~v4 & ~v6 & ~arp
    out.add(r, V, U, l3, other & ok)
    if arp.any():
        _arp_variants(out, f, *_pick(arp, r, V, U, ok), l3, addrs)
    if v4.any():
        _ipv4_variants(out, f, *_pick(v4, r, V, U, ok), l3, coarse, addrs)
    if v6.any():
        _ipv6_variants(out, f, *_pick(v6, r, V, U, ok), l3, coarse, addrs)


def _arp_variants(out: _Chunks, f: dict, r, V, U, ok, l3: int, addrs: bool = True) -> None:
    """ARP/RARP rows record the bytes libpcap's `arp host` compares, nothing else of the
    header: sender (l3 + 14) and target (l3 + 24) protocol address."""
    s = (f["flags"][r] & F_ADDRS) != 0
    sender, target = l3 + builder.ARP_SENDER, l3 + builder.ARP_TARGET
    if addrs:
        V[s, sender : sender + 4] = f["src"][r][s][:, 12:16]
        V[s, target : target + 4] = f["dst"][r][s][:, 12:16]
        U[s, sender : sender + 4] = 0
        U[s, target : target + 4] = 0
    KL = np.where(s, l3 + builder.ARP_ADDRS_END, l3)
    out.add(r, V, U, KL, ok, _addr_span(s, sender, l3 + builder.ARP_ADDRS_END))


def _ipv4_variants(
    out: _Chunks, f: dict, r, V, U, ok, l3: int, coarse: bool, addrs: bool = True
) -> None:
    flags = f["flags"][r]
    KL = np.full(len(r), l3, np.int64)
    s = (flags & F_PROTO) != 0
    V[s, l3 + 9] = f["proto"][r][s]
    U[s, l3 + 9] = 0
    KL[s] = l3 + 10
    # The fragment field is read whenever the protocol is: a zero offset unless flagged.
    s2 = s & ((flags & F_FRAG) == 0)
    V[s2, l3 + 6] &= 0xE0
    V[s2, l3 + 7] = 0
    U[s2, l3 + 6] = 0xE0
    U[s2, l3 + 7] = 0
    s = (flags & F_ADDRS) != 0
    if addrs:
        V[s, l3 + 12 : l3 + 16] = f["src"][r][s][:, 12:16]
        V[s, l3 + 16 : l3 + 20] = f["dst"][r][s][:, 12:16]
        U[s, l3 + 12 : l3 + 20] = 0
    KL[s] = l3 + 20
    wp = ((flags & F_PORTS) != 0) & (not coarse)
    # Without ports the header length stays unknown; anything that depends on it is undetermined.
    out.add(r, V, U, KL, ~wp & ok, _addr_span(s, l3 + 12, l3 + 20))
    r, V, U, ok, KL = r[wp], V[wp], U[wp], ok[wp], KL[wp]
    ports = f["ports"][r]
    for ihl in range(16):
        v, u, o = V.copy(), U.copy(), ok.copy()
        _know(v, u, o, l3, np.array([ihl]), unknown=0xF0)
        l4 = l3 + 4 * ihl
        _know(v, u, o, l4, ports)
        out.add(r, v, u, np.maximum(KL, l4 + 4), o)


def _ipv6_variants(
    out: _Chunks, f: dict, r, V, U, ok, l3: int, coarse: bool, addrs: bool = True
) -> None:
    flags = f["flags"][r]
    KL = np.full(len(r), l3, np.int64)
    s = (flags & F_ADDRS) != 0
    if addrs:
        V[s, l3 + 8 : l3 + 24] = f["src"][r][s]
        V[s, l3 + 24 : l3 + 40] = f["dst"][r][s]
        U[s, l3 + 8 : l3 + 40] = 0
    KL[s] = l3 + 40
    full = s & ((flags & F_PROTO) != 0) & (not coarse)
    out.add(r, V, U, KL, ~full & ok, _addr_span(s, l3 + 8, l3 + 40))
    r, V, U, ok, flags = r[full], V[full], U[full], ok[full], flags[full]
    P = f["proto"][r]
    # No extension header: the next header is the transport protocol, ports follow.
    v, u = V.copy(), U.copy()
    v[:, l3 + 6] = P
    u[:, l3 + 6] = 0
    wp = (flags & F_PORTS) != 0
    v[wp, l3 + 40 : l3 + 44] = f["ports"][r][wp]
    u[wp, l3 + 40 : l3 + 44] = 0
    out.add(r, v, u, np.where(wp, l3 + 44, l3 + 40), ok)
    # Extension headers first: their content is unknown, except that a fragment header's next
    # header is either the transport protocol or another extension header.
    for ext in IPV6_EXT:
        s = P != ext
        rr, v, u, o = r[s], V[s].copy(), U[s].copy(), ok[s]
        v[:, l3 + 6] = ext
        u[:, l3 + 6] = 0
        if ext != 44:
            out.add(rr, v, u, l3 + 41, o)
            continue
        for nxt in (None, *IPV6_EXT):
            v2, u2 = v.copy(), u.copy()
            v2[:, l3 + 40] = P[s] if nxt is None else nxt
            u2[:, l3 + 40] = 0
            out.add(rr, v2, u2, l3 + 41, o)


def _t_and(av, am, bv, bm):
    alpha, beta = av | am, bv | bm
    v = av & bv
    return v, alpha & beta & ~v


def _t_or(av, am, bv, bm):
    v = av | bv
    return v, (am | bm) & ~v


def _t_xor(av, am, bv, bm):
    m = am | bm
    return (av ^ bv) & ~m, m


def _t_add(av, am, bv, bm):
    sm = am + bm
    sv = av + bv
    sigma = sm + sv
    chi = sigma ^ sv
    mu = chi | am | bm
    return sv & ~mu, mu


def _t_sub(av, am, bv, bm):
    dv = av - bv
    alpha = dv + am
    beta = dv - bm
    chi = alpha ^ beta
    mu = chi | am | bm
    return dv & ~mu, mu


class _AbstractBpf:
    """The compiled program run over tnum packets, many at once; outcome NO/YES/MAYBE each."""

    def __init__(self, flt: Filter):
        self.code = [int(c) for c in flt.insns["code"]]
        self.jt = [int(c) for c in flt.insns["jt"]]
        self.jf = [int(c) for c in flt.insns["jf"]]
        self.k = [int(c) for c in flt.insns["k"]]

    def run(
        self, V: np.ndarray, Um: np.ndarray, KL: np.ndarray, spans: np.ndarray | None = None
    ) -> np.ndarray:
        """Outcome per variant; with `spans`, also whether a load at a known position touched
        each variant's [start, stop) byte span, as `self.touched`."""
        n = len(KL)
        nins = len(self.code)
        res = np.full(n, MAYBE, dtype=np.int8)
        self.touched = np.zeros(n, bool)
        if nins == 0:
            res[:] = YES
            return res
        Av = np.zeros(n, U32)
        Am = np.zeros(n, U32)
        Xv = np.zeros(n, U32)
        Xm = np.zeros(n, U32)
        Mv = np.zeros((bpf.BPF_MEMWORDS, n), U32)
        Mm = np.zeros((bpf.BPF_MEMWORDS, n), U32)
        pending: list[list[np.ndarray]] = [[] for _ in range(nins + 1)]
        pending[0].append(np.arange(n))
        for pc in range(nins):
            parts = pending[pc]
            if not parts:
                continue
            idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if len(idx) == 0:
                continue
            code, k = self.code[pc], self.k[pc]
            cls = code & 7
            nxt = pc + 1
            if cls == bpf.BPF_RET:
                rv = code & 0x18
                if rv == bpf.BPF_K:
                    res[idx] = YES if k else NO
                else:
                    v, m = (Av[idx], Am[idx]) if rv == bpf.BPF_A else (Xv[idx], Xm[idx])
                    res[idx] = np.where(v != 0, YES, np.where((v | m) == 0, NO, MAYBE))
                continue
            if cls == bpf.BPF_JMP:
                op = code & 0xF0
                if op == bpf.BPF_JA:
                    if nxt + k < nins:
                        pending[nxt + k].append(idx)
                    continue  # a loop (protochain) wraps k backwards: undetermined
                av, am = Av[idx], Am[idx]
                if code & bpf.BPF_X:
                    bv, bm = Xv[idx], Xm[idx]
                else:
                    bv, bm = np.full(len(idx), k, U32), np.zeros(len(idx), U32)
                if op == bpf.BPF_JEQ:
                    t = (am == 0) & (bm == 0) & (av == bv)
                    f = ((av ^ bv) & ~(am | bm)) != 0
                elif op == bpf.BPF_JGT:
                    t = av > (bv | bm)
                    f = (av | am) <= bv
                elif op == bpf.BPF_JGE:
                    t = av >= (bv | bm)
                    f = (av | am) < bv
                elif op == bpf.BPF_JSET:
                    v, m = _t_and(av, am, bv, bm)
                    t = v != 0
                    f = (v | m) == 0
                else:
                    continue  # unknown jump: stays MAYBE
                pending[nxt + self.jt[pc]].append(idx[t])
                pending[nxt + self.jf[pc]].append(idx[f])
                continue  # neither t nor f: MAYBE
            if cls in (bpf.BPF_LD, bpf.BPF_LDX):
                mode = code & 0xE0
                size = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}.get(code & 0x18, 0)
                tv, tm = (Av, Am) if cls == bpf.BPF_LD else (Xv, Xm)
                if mode == bpf.BPF_IMM:
                    tv[idx], tm[idx] = k, 0
                elif mode == bpf.BPF_LEN:
                    tv[idx], tm[idx] = 0, FULL
                elif mode == bpf.BPF_MEM:
                    tv[idx], tm[idx] = Mv[k][idx], Mm[k][idx]
                elif mode in (bpf.BPF_ABS, bpf.BPF_IND, bpf.BPF_MSH):
                    if mode == bpf.BPF_MSH:
                        size = 1
                    if not size:
                        continue
                    if mode == bpf.BPF_IND:
                        okx = Xm[idx] == 0  # an unknown index: undetermined
                        idx = idx[okx]
                        off = Xv[idx].astype(np.int64) + k
                    else:
                        off = np.full(len(idx), k, np.int64)
                    if spans is not None:
                        sp = spans[idx]
                        self.touched[idx] |= (off < sp[:, 1]) & (off + size > sp[:, 0])
                    ok = off + size <= KL[idx]
                    idx, off = idx[ok], off[ok]
                    v = np.zeros(len(idx), U32)
                    m = np.zeros(len(idx), U32)
                    for b in range(size):
                        v = (v << 8) | V[idx, off + b]
                        m = (m << 8) | Um[idx, off + b]
                    if mode == bpf.BPF_MSH:
                        v, m = (v & 0xF) << 2, (m & 0xF) << 2
                    tv[idx], tm[idx] = v, m
                else:
                    continue
                pending[nxt].append(idx)
                continue
            if cls == bpf.BPF_ST:
                Mv[k][idx], Mm[k][idx] = Av[idx], Am[idx]
            elif cls == bpf.BPF_STX:
                Mv[k][idx], Mm[k][idx] = Xv[idx], Xm[idx]
            elif cls == bpf.BPF_MISC:
                if code & 0xF8 == bpf.BPF_TXA:
                    Av[idx], Am[idx] = Xv[idx], Xm[idx]
                else:
                    Xv[idx], Xm[idx] = Av[idx], Am[idx]
            elif cls == bpf.BPF_ALU:
                idx = self._alu(code, k, idx, Av, Am, Xv, Xm, res)
            else:
                continue
            pending[nxt].append(idx)
        return res

    @staticmethod
    def _alu(code, k, idx, Av, Am, Xv, Xm, res):
        op = code & 0xF0
        av, am = Av[idx], Am[idx]
        if op == bpf.BPF_NEG:
            known = am == 0
            Av[idx] = np.where(known, U32(0) - av, 0)
            Am[idx] = np.where(known, 0, FULL)
            return idx
        if code & bpf.BPF_X:
            bv, bm = Xv[idx], Xm[idx]
        else:
            bv, bm = np.full(len(idx), k, U32), np.zeros(len(idx), U32)
        known = (am == 0) & (bm == 0)
        if op in (bpf.BPF_DIV, bpf.BPF_MOD):
            # A known zero divisor rejects the packet; a possibly zero one is undetermined.
            zero = (bm == 0) & (bv == 0)
            res[idx[zero]] = NO
            maybe_zero = (bm != 0) & ((bv | bm) != 0) & (bv == 0)
            keep = ~zero & ~maybe_zero
            idx, av, am = idx[keep], av[keep], am[keep]
            bv, bm, known = bv[keep], bm[keep], known[keep]
            safe = np.where(bv == 0, U32(1), bv)
            r = av // safe if op == bpf.BPF_DIV else av % safe
            v, m = np.where(known, r, 0), np.where(known, 0, FULL)
        elif op == bpf.BPF_MUL:
            v, m = np.where(known, av * bv, 0), np.where(known, 0, FULL)
        elif op == bpf.BPF_ADD:
            v, m = _t_add(av, am, bv, bm)
        elif op == bpf.BPF_SUB:
            v, m = _t_sub(av, am, bv, bm)
        elif op == bpf.BPF_AND:
            v, m = _t_and(av, am, bv, bm)
        elif op == bpf.BPF_OR:
            v, m = _t_or(av, am, bv, bm)
        elif op == bpf.BPF_XOR:
            v, m = _t_xor(av, am, bv, bm)
        elif op in (bpf.BPF_LSH, bpf.BPF_RSH):
            big = bv >= 32
            sh = np.where(big, 0, bv).astype(U32)
            if op == bpf.BPF_LSH:
                v, m = av << sh, am << sh
            else:
                v, m = av >> sh, am >> sh
            v = np.where(big, 0, v)
            m = np.where(big, 0, m)
            # An unknown shift amount makes everything unknown.
            v = np.where(bm != 0, 0, v)
            m = np.where(bm != 0, FULL, m)
        else:
            Am[idx] = FULL
            return idx
        Av[idx] = v.astype(U32)
        Am[idx] = m.astype(U32)
        return idx


_HASH_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
     0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53],
    dtype=np.uint64,
)


def _hash_columns(cols: np.ndarray) -> np.ndarray:
    """A 64-bit multiply-xor hash per row of uint64 words held column by column (k, n)."""
    h = np.zeros(cols.shape[1], np.uint64)
    for j, col in enumerate(cols):
        h ^= col
        h *= _HASH_MULT[j % len(_HASH_MULT)]
        h ^= h >> np.uint64(29)
    return h


def _distinct(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values of `h`, a position of each in `h`, and each element's index in
    the distinct values (np.unique's, without its slower stable sort: docs/BENCHMARKS.md, D3)."""
    order = np.argsort(h)
    sh = h[order]
    start = np.ones(len(h), bool)
    start[1:] = sh[1:] != sh[:-1]
    inv = np.empty(len(h), np.int64)
    inv[order] = np.cumsum(start) - 1
    return sh[start], order[start], inv


def _equal_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise equality of two (k, n) column arrays."""
    diff = np.zeros(a.shape[1], np.uint64)
    for x, y in zip(a, b, strict=True):
        diff |= x ^ y
    return diff == 0


class _Cache:
    """Decisions of rows seen before (in earlier files), found by a hash of the row and verified
    against the full row, so a hash collision only costs a recomputation. Rows are kept as
    columns of 64-bit words (column-wise numpy is faster here: docs/BENCHMARKS.md, D17)."""

    def __init__(self, width: int) -> None:
        self.keys = np.zeros(0, np.uint64)
        self.cols = np.zeros((width, 0), np.uint64)
        self.dec = np.zeros(0, np.int8)
        self.extra = np.zeros(0, bool)

    def lookup(self, h: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit, position) per row; `h` sorted (searching sorted hashes is much faster)."""
        if not len(self.keys):
            return np.zeros(len(h), bool), np.zeros(len(h), np.int64)
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        hit = self.keys[pos] == h
        hit[hit] = _equal_columns(np.take(self.cols, pos[hit], axis=1), cols[:, hit])
        return hit, pos

    def add(self, h: np.ndarray, cols: np.ndarray, dec: np.ndarray, extra: np.ndarray) -> None:
        """Insert rows with sorted, distinct hashes that are not in the cache yet."""
        if len(self.keys):
            new = self.keys[np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)] != h
            h, cols, dec, extra = h[new], cols[:, new], dec[new], extra[new]
        at = np.searchsorted(self.keys, h)
        self.keys = np.insert(self.keys, at, h)
        self.cols = np.insert(self.cols, at, cols, axis=1)
        self.dec = np.insert(self.dec, at, dec)
        self.extra = np.insert(self.extra, at, extra)


def _field_mask(*fields: str) -> np.ndarray:
    """Per 64-bit word of a flow row: the bits outside `fields` (AND-ing wipes the fields)."""
    keep = np.full(indexfile.FLOW_DTYPE.itemsize, 0xFF, np.uint8)
    for name in fields:
        dtype, offset = indexfile.FLOW_DTYPE.fields[name][:2]
        keep[offset : offset + dtype.itemsize] = 0
    return keep.view("<u8")


# The levels at which rows are decided, cheapest first: the fields wiped from the row so that
# rows share a decision, and the variant enumeration. Each is a sound abstraction of the row
# (the wiped fields are unknown, not absent), so a YES or NO at any level is final.
_LEVELS = {
    "shape": _field_mask("sport", "dport", "src", "dst"),  # addresses and ports unknown
    "hosts": _field_mask("sport", "dport"),  # addresses known, IPv4 header length unknown
    "full": _field_mask(),  # everything the row records, header lengths enumerated
}


class FlowMatcher:
    """Decides index flow rows for one compiled filter; remembers rows it has seen.

    Rows are decided level by level (see _LEVELS), each only for the rows the level before
    left undecided, and each on distinct rows only: filters on protocols or VLANs never pay
    for the number of hosts or ports, and a host filter never for the number of ports.
    """

    def __init__(self, flt: Filter):
        self.filter = flt
        self.supported = flt.linktype == DLT_EN10MB
        self._vm = _AbstractBpf(flt)
        self._cache = {name: _Cache(int((m != 0).sum())) for name, m in _LEVELS.items()}
        self.demoted = 0  # determined outcomes libpcap disagreed with (should stay 0)

    def decide(self, flows: np.ndarray) -> np.ndarray:
        """NO / YES / MAYBE for each row of a distinct-flow table."""
        n = len(flows)
        out = np.full(n, MAYBE, dtype=np.int8)
        if n == 0:
            return out
        if self.filter.matches_everything:
            out[:] = YES
            return out
        if not self.supported:
            return out
        # Plain 64-bit words: structured-array copies and field writes are far slower.
        words = np.ascontiguousarray(flows).view("<u8").reshape(n, -1)
        # Shape first; its undecided rows go on to hosts only where the program looked at the
        # addresses (otherwise knowing them cannot help), and the rest straight to full.
        dec, addr_relevant = self._level("shape", words)
        out[:] = dec
        hosts = np.flatnonzero((dec == MAYBE) & addr_relevant)
        if len(hosts):
            out[hosts], _ = self._level("hosts", words[hosts])
        todo = np.flatnonzero(out == MAYBE)
        if len(todo):
            out[todo], _ = self._level("full", words[todo])
        return out

    def _level(self, level: str, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decisions of rows at one level, through the cache: (decision, address relevant)."""
        mask = _LEVELS[level]
        keep = np.flatnonzero(mask != 0)
        cols = np.ascontiguousarray((words[:, keep] & mask[keep]).T)  # the words the level keeps
        h = _hash_columns(cols)
        # Distinct rows: one row of each hash stands for the others, verified equal to it.
        uh, first, inv = _distinct(h)
        ucols = np.take(cols, first, axis=1)
        same = _equal_columns(cols, np.take(ucols, inv, axis=1))
        cache = self._cache[level]
        hit, pos = cache.lookup(uh, ucols)
        udec = np.empty(len(uh), np.int8)
        uextra = np.empty(len(uh), bool)
        udec[hit], uextra[hit] = cache.dec[pos[hit]], cache.extra[pos[hit]]
        miss = np.flatnonzero(~hit)
        if len(miss):
            udec[miss], uextra[miss] = self._decide(words[first[miss]] & mask, level)
            cache.add(uh[miss], ucols[:, miss], udec[miss], uextra[miss])
        dec, extra = udec[inv], uextra[inv]
        odd = np.flatnonzero(~same)  # a hash collision among these rows: decide those alone
        if len(odd):
            dec[odd], extra[odd] = self._decide(words[odd] & mask, level)
        return dec, extra

    def _decide(self, words: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
        flows = np.ascontiguousarray(words).view(indexfile.FLOW_DTYPE).reshape(-1)
        size = ROWS_PER_BLOCK if level == "full" else 16 * ROWS_PER_BLOCK
        parts = [self._decide_variants(flows[i : i + size], level)
                 for i in range(0, len(flows), size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _decide_variants(self, flows: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
        """Decision per row and, at the shape level, whether the addresses could matter."""
        nrows = len(flows)
        shape = level == "shape"
        V, Um, KL, rows, spans = _build_variants(flows, coarse=level != "full", addrs=not shape)
        outcome = self._vm.run(V, Um, KL, spans if shape else None)
        # Cross-check one determined variant per row on a concrete member (unknown bits zero)
        # with the concrete matcher (libpcap's semantics, verified against libpcap by the
        # tests); all of them would cost more than the rest of the work.
        det = np.nonzero(outcome != MAYBE)[0]
        if len(det):
            _, first = np.unique(rows[det], return_index=True)
            det = det[first]
            conc = np.ascontiguousarray(V[det] & ~Um[det])
            offs = np.arange(len(det), dtype=np.int64) * SYN_LEN
            lens = np.full(len(det), SYN_LEN, dtype=np.int64)
            truth = self.filter.match_many(conc.reshape(-1), offs, lens, lens)
            bad = truth != (outcome[det] == YES)
            if bad.any():
                self.demoted += int(bad.sum())
                outcome[np.isin(rows, rows[det[bad]])] = MAYBE
        # Combine variants: all NO -> NO, all YES -> YES, otherwise MAYBE.
        any_no = np.zeros(nrows, bool)
        any_yes = np.zeros(nrows, bool)
        any_maybe = np.zeros(nrows, bool)
        any_no[rows[outcome == NO]] = True
        any_yes[rows[outcome == YES]] = True
        any_maybe[rows[outcome == MAYBE]] = True
        dec = np.where(any_maybe | (any_no & any_yes), MAYBE, np.where(any_yes, YES, NO))
        # Knowing the addresses can only settle a row whose undecided variants read them: a
        # run that never loads them takes the same path with them known.
        relevant = np.zeros(nrows, bool)
        if shape:
            relevant[rows[(outcome == MAYBE) & self._vm.touched]] = True
        return dec.astype(np.int8), relevant
