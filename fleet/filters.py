"""tcpdump filters the catalogue can answer, as SQL over its conversation rows.

A small, safe subset: `host ADDR`, `net ADDR/LEN`, `[tcp|udp] port N`, the protocols `tcp`,
`udp`, `sctp`, `icmp`, `icmp6`, `ip`, `ip6`, `arp`, joined by `and`/`&&`, `or`/`||`,
`not`/`!` and parentheses. Values are parsed (ipaddress, int) and bound as query parameters;
no text of the filter reaches the SQL. Anything else (src/dst, vlan, byte offsets, names to
resolve, qualifiers carried over as in `host a or b`) is `NotExpressible`: the caller asks
the sensors instead, whose libpcap decides.

A catalogue row stands for packets of one of three views (npcapserve's /api/v1/catalogue,
the `view` column), and libpcap's primitives see each differently:

- `ip` (0): untagged IPv4, and IPv6 whose transport header comes first: the row's addresses,
  ports and protocol decide every primitive;
- `tagged` (1): IP inside VLAN or other tags: no primitive here looks through a tag, so each
  is false and the filter is a constant for all of them;
- `ip6ext` (2): IPv6 with extension headers before the transport header: `host`, `net`,
  `ip6` are decided by the row, but libpcap's port and protocol tests do not walk extension
  headers, so the row cannot say; such a row is "unsure" when the answer depends on them, and
  its dump set is then asked.

Non-IP frames (ARP and others) have no row, only the files' `other_packets`: `host`, `net`
and `arp` may match an ARP packet, every other primitive is false; a filter that may match
(three-valued logic: True, False or None for "maybe") keeps such files candidates.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from pcapvault.index.errors import PcapVaultError

PROTOCOLS = {"tcp": "tcp", "udp": "udp", "sctp": "sctp", "icmp": "icmp", "icmp6": "icmpv6"}
PORT_PROTOCOLS = ("tcp", "udp", "sctp")
_TOKEN = re.compile(r"\s*(\(|\)|!|&&|\|\||[^\s()!&|]+)")
_JOIN = {"and": "and", "&&": "and", "or": "or", "||": "or"}
_WORDS = {*_JOIN, "not", "!", "(", ")"}
# Longer or deeper filters go to the sensors (libpcap takes them): the SQL of a filter must
# stay within what ClickHouse parses (its max_parser_depth, max_query_size).
MAX_WORDS = 600
MAX_DEPTH = 40

Node = tuple  # ("and", a, b, ...) | ("or", a, b, ...) | ("not", a) | (primitive, value...)


class NotExpressible(PcapVaultError):
    """A filter the catalogue cannot answer exactly: ask the sensors."""


def parse(expr: str) -> Node | None:
    """The filter's tree (None for the empty filter), or NotExpressible."""
    tokens = _tokens(expr)
    if not tokens:
        return None
    if sum(t not in _WORDS for t in tokens) > MAX_WORDS:
        raise NotExpressible(f"more than {MAX_WORDS} words")
    node, at = _Parser(tokens).expression(0, 0)
    if at < len(tokens):
        raise NotExpressible(f"cannot translate {' '.join(tokens[at:at + 3])!r}")
    return node


def _tokens(expr: str) -> list[str]:
    out, at = [], 0
    while at < len(expr):
        m = _TOKEN.match(expr, at)
        if not m or not m.group(1):
            if expr[at:].strip():
                raise NotExpressible(f"cannot translate {expr[at:at + 20]!r}")
            break
        out.append(m.group(1))
        at = m.end()
    return out


class _Parser:
    """libpcap's grammar for the subset: `and` and `or` bind equally, left to right (`a or
    b and c` is `(a or b) and c`), `not` closer. A run of one operator is one node of many
    terms; nesting (parentheses, `not`, `and` after `or`) is bounded by MAX_DEPTH, so no
    filter a user types, nor its SQL, recurses deeper."""

    def __init__(self, tokens: list[str]):
        self.t = tokens

    def expression(self, at: int, depth: int) -> tuple[Node, int]:
        node, at = self.term(at, depth)
        while at < len(self.t) and self.t[at] in _JOIN:
            op = _JOIN[self.t[at]]
            right, at = self.term(at + 1, depth)
            if node[0] == op:
                node = (*node, right)
            else:
                depth += 1
                node = (op, node, right)
            self.deeper(depth)
        return node, at

    def term(self, at: int, depth: int) -> tuple[Node, int]:
        self.deeper(depth)
        t = self.t
        if at >= len(t):
            raise NotExpressible("the filter ends early")
        if t[at] in ("not", "!"):
            node, at = self.term(at + 1, depth + 1)
            return ("not", node), at
        if t[at] == "(":
            node, at = self.expression(at + 1, depth + 1)
            if at >= len(t) or t[at] != ")":
                raise NotExpressible("unbalanced parentheses")
            return node, at + 1
        node, rest = _primitive(t[at:at + 3])
        return node, at + min(len(t) - at, 3) - len(rest)

    @staticmethod
    def deeper(depth: int) -> None:
        if depth > MAX_DEPTH:
            raise NotExpressible(f"nested more than {MAX_DEPTH} deep")


def _primitive(t: list[str]) -> tuple[Node, list[str]]:
    word = t[0]
    if word == "host" and len(t) > 1:
        try:
            addr = ipaddress.ip_address(t[1])
        except ValueError:
            raise NotExpressible(f"host {t[1]!r} is not an address") from None
        return ("host", _mapped(addr), addr.version), t[2:]
    if word == "net" and len(t) > 1:
        try:
            net = ipaddress.ip_network(t[1])
        except ValueError:
            raise NotExpressible(f"net {t[1]!r} is not ADDRESS/LENGTH") from None
        return ("net", _mapped(net.network_address), _mapped(net.broadcast_address),
                net.version), t[2:]
    if word in ("tcp", "udp", "sctp") and len(t) > 2 and t[1] == "port":
        return ("port", word, _port(t[2])), t[3:]
    if word == "port" and len(t) > 1:
        return ("port", None, _port(t[1])), t[2:]
    if word in PROTOCOLS or word in ("ip", "ip6", "arp"):
        if len(t) > 1 and t[1] not in _JOIN and t[1] != ")":
            raise NotExpressible(f"cannot translate {word} {t[1]}")
        return (word,), t[1:]
    raise NotExpressible(f"cannot translate {word!r}")


def _port(text: str) -> int:
    """A port as libpcap reads numbers: 0x.. hexadecimal, 0.. octal, else decimal."""
    if len(text) <= 8 and re.fullmatch(r"0[xX][0-9A-Fa-f]+", text):
        n = int(text, 16)
    elif len(text) <= 8 and re.fullmatch(r"0[0-7]*", text):
        n = int(text, 8)
    elif len(text) <= 8 and re.fullmatch(r"[1-9][0-9]*", text):
        n = int(text)
    else:
        raise NotExpressible(f"port {text!r} is not a number (names are the sensors' to look up)")
    if n > 65535:
        raise NotExpressible(f"port {text!r} is above 65535")
    return n


def _mapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """An address as the catalogue stores it: IPv4 mapped into IPv6. (The row's `ipver`
    tells an IPv4 packet's mapped address from an IPv6 packet's `::ffff:` one; libpcap's
    `host ::ffff:a.b.c.d` is an IPv6 test.)"""
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{addr}")
    return addr


@dataclass
class Sql:
    """A condition over conversation rows, with its parameters."""

    text: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conditions:
    """Which rows match for sure, which may (`possible`), and which cannot be decided from
    the row (`unsure`: ip6ext rows whose answer hangs on a port or protocol)."""

    match: Sql
    possible: Sql
    unsure: Sql


def conditions(node: Node | None, prefix: str = "f") -> Conditions:
    """The SQL of `node` over the three views of conversation rows."""
    if node is None:
        return Conditions(Sql("1"), Sql("1"), Sql("0"))
    params: dict[str, Any] = {}
    plain, _ = _sql(node, params, prefix, ext=False)
    sure, maybe = _sql(node, params, prefix, ext=True)
    tagged = " OR view = 1" if evaluate(node, "tagged") else ""
    return Conditions(
        Sql(f"((view = 0 AND {plain}) OR (view = 2 AND {sure}){tagged})", params),
        Sql(f"((view = 0 AND {plain}) OR (view = 2 AND {maybe}){tagged})", params),
        Sql(f"(view = 2 AND {maybe} AND NOT {sure})", params))


def _sql(node: Node, params: dict[str, Any], prefix: str, ext: bool) -> tuple[str, str]:
    """(matches surely, matches possibly) for rows of the ip view (`ext` false: the two are
    the same) or of the ip6ext view (ports and protocols unknown)."""
    kind = node[0]
    if kind in ("and", "or"):
        parts = [_sql(n, params, prefix, ext) for n in node[1:]]
        op = f" {kind.upper()} "
        return (f"({op.join(s for s, _ in parts)})", f"({op.join(p for _, p in parts)})")
    if kind == "not":
        s1, p1 = _sql(node[1], params, prefix, ext)
        return f"(NOT {p1})", f"(NOT {s1})"

    def bind(value: Any, ch_type: str) -> str:
        name = f"{prefix}{len(params)}"
        params[name] = value
        return f"{{{name}:{ch_type}}}"

    if kind == "host":
        a = bind(str(node[1]), "IPv6")
        text = f"(ipver = {node[2]} AND (addr_lo = {a} OR addr_hi = {a}))"
    elif kind == "net":
        lo, hi = bind(str(node[1]), "IPv6"), bind(str(node[2]), "IPv6")
        text = (f"(ipver = {node[3]} AND (addr_lo BETWEEN {lo} AND {hi} OR "
                f"addr_hi BETWEEN {lo} AND {hi}))")
    elif kind == "ip":
        text = "(ipver = 4)"
    elif kind == "ip6":
        text = "(ipver = 6)"
    elif kind == "arp":
        text = "0"
    elif ext:
        return "0", "1"  # a port or protocol behind extension headers: libpcap decides
    elif kind == "port":
        protos = (node[1],) if node[1] else PORT_PROTOCOLS
        p = bind(node[2], "UInt16")
        names = ", ".join(f"'{x}'" for x in protos)  # our own constants
        text = f"(ported = 1 AND protocol IN ({names}) AND (port_lo = {p} OR port_hi = {p}))"
    else:
        extra = " AND ipver = 4" if kind == "icmp" else ""
        text = f"(protocol = '{PROTOCOLS[kind]}'{extra})"
    return text, text


def evaluate(node: Node | None, kind: str) -> bool | None:
    """Whether `node` matches every (True), no (False) or some (None) packet of a kind that
    rows do not describe: "tagged" (IP inside tags) or "other" (non-IP frames)."""
    if node is None:
        return True
    op = node[0]
    if op == "not":
        v = evaluate(node[1], kind)
        return None if v is None else not v
    if op in ("and", "or"):
        values = [evaluate(n, kind) for n in node[1:]]
        decisive = op == "or"  # the value that decides the whole: True for or, False for and
        if decisive in values:
            return decisive
        return None if None in values else not decisive
    if kind == "other" and (op == "arp" or op in ("host", "net") and node[-1] == 4):
        return None  # ARP and RARP carry IPv4 addresses
    return False
