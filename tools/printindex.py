"""npcapprintindex: show or check a `.pcap.idx` index.

Prints the header, the distinct-flow summary (each flow's packets and, from index version 4
on, its wire bytes and first and last timestamp), the address postings' keys and the
per-packet entries, as text or JSON lines. `-c` checks an index against its pcap instead:
checksum and version, internal consistency (the totals too), that every entry describes the
record really found at its offset (lengths, timestamp, and flow fields re-derived from the
packet's headers), and that the postings (every list, each frame decompressed and its
checksum verified, and the block time table) are those the pcap gives.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import click
import numpy as np

from pcapvault.index.builder import index_records
from pcapvault.index.cliutil import run
from pcapvault.index.errors import FormatError
from pcapvault.index.indexfile import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    FLAG_ADDRS,
    FLAG_FRAGMENT,
    FLAG_PORTS,
    FLAG_PROTO,
    FLOW_DTYPE,
    VLAN_ABSENT,
    VLAN_UNREADABLE,
    PacketIndex,
    address_text,
    build_postings,
    flows_as_version,
    index_problem,
    postings_problem,
    read_index,
    read_postings,
    records_problem,
)
from pcapvault.index.pcapfile import PcapReader, scan_records
from pcapvault.index.postings import NoPostings, Postings, time_bins

PROG = "npcapprintindex"
EXIT_PROBLEM = 1
EXIT_BAD_INPUT = 2

_ETHERTYPES = {ETHERTYPE_IPV4: "ip", ETHERTYPE_IPV6: "ip6", ETHERTYPE_ARP: "arp", 0x8035: "rarp"}
_PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah",
              58: "icmp6", 89: "ospf", 103: "pim", 112: "vrrp", 132: "sctp", 136: "udplite"}


def format_time(ts_ns: int, nanosecond: bool) -> tuple[str, str]:
    """(ISO 8601 UTC, epoch) text of a timestamp, at the pcap's precision."""
    sec, frac = divmod(ts_ns, 1_000_000_000)
    digits = f"{frac:09d}" if nanosecond else f"{frac // 1000:06d}"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{digits}Z"
    return iso, f"{sec}.{digits}"


def _vlan(v: int) -> int | str | None:
    if v == VLAN_ABSENT:
        return None
    return "unreadable" if v == VLAN_UNREADABLE else v


def flow_record(row: np.void) -> dict[str, Any]:
    """A flow row as a JSON-ready dict; absent fields are None."""
    flags = int(row["flags"])
    ipver = int(row["ipver"])
    addrs = bool(flags & FLAG_ADDRS)
    ports = bool(flags & FLAG_PORTS)
    family = 6 if ipver == 6 else 4  # ARP/RARP rows hold IPv4-mapped protocol addresses
    return {
        "ethertype": int(row["ethertype"]),
        "vlan1": _vlan(int(row["vlan1"])),
        "vlan2": _vlan(int(row["vlan2"])),
        "ipver": ipver or None,
        "proto": int(row["proto"]) if ipver and flags & FLAG_PROTO else None,
        "src": address_text(row["src"], family) if addrs else None,
        "dst": address_text(row["dst"], family) if addrs else None,
        "sport": int(row["sport"]) if ports else None,
        "dport": int(row["dport"]) if ports else None,
        "fragment": bool(flags & FLAG_FRAGMENT),
    }


def describe_flow(row: np.void) -> str:
    """One-line, tcpdump-like description of a flow row."""
    f = flow_record(row)
    words = []
    for key in ("vlan1", "vlan2"):
        if f[key] is not None:
            words.append(f"vlan {f[key]}")
    et = f["ethertype"]
    words.append(_ETHERTYPES.get(et, f"ethertype 0x{et:04x}"))
    if f["proto"] is not None:
        words.append(_PROTOCOLS.get(f["proto"], f"proto {f['proto']}"))
    if f["src"] is not None:
        if f["sport"] is not None:
            words.append(f"{f['src']}.{f['sport']} > {f['dst']}.{f['dport']}")
        else:
            words.append(f"{f['src']} > {f['dst']}")
    elif f["ipver"]:
        words.append("(addresses not captured)")
    if f["fragment"]:
        words.append("fragment")
    return " ".join(words)


def key_record(postings: Postings, key: int) -> dict[str, Any]:
    """A postings key as a JSON-ready dict; the address is None for an "address unknown"
    list."""
    address, ethertype, unknown = postings.key(key)
    family = 6 if ethertype == ETHERTYPE_IPV6 else 4  # ARP/RARP keys are IPv4-mapped
    entries, sources = postings.size(key), postings.sources(key)
    return {
        "key": key,
        "address": None if unknown else address_text(address, family),
        "ethertype": ethertype,
        "entries": entries,
        "sources": sources,
        "destinations": entries - sources,
    }


def describe_key(postings: Postings, key: int) -> str:
    k = key_record(postings, key)
    et = k["ethertype"]
    name = _ETHERTYPES.get(et, f"ethertype 0x{et:04x}")
    if k["address"] is None:
        return f"{name} (addresses not captured): {k['entries']} packets"
    return (f"{name} {k['address']}: {k['entries']} packets ({k['sources']} as source, "
            f"{k['destinations']} as destination)")


def header_record(idx: PacketIndex, path: str, postings: Postings | None = None
                  ) -> dict[str, Any]:
    first_iso, first_epoch = format_time(idx.first_ns, idx.nanosecond)
    last_iso, last_epoch = format_time(idx.last_ns, idx.nanosecond)
    return {
        "index": path,
        "version": idx.version,
        "precision": "ns" if idx.nanosecond else "us",
        "linktype": idx.linktype,
        "packets": idx.count,
        "first": first_iso,
        "first_epoch": first_epoch,
        "last": last_iso,
        "last_epoch": last_epoch,
        "pcap_size": idx.pcap_size,
        "flows": len(idx.flows),
        "postings": None if postings is None else {
            "keys": postings.keys, "frames": postings.frames, "bytes": postings.frames_len,
            "time_blocks": postings.block_count},
    }


def _shown(total: int, limit: int | None) -> int:
    return total if limit is None else min(limit, total)


def _text_lines(idx: PacketIndex, path: str, limit: int | None, postings: Postings | None
                ) -> Iterator[str]:
    h = header_record(idx, path, postings)
    yield f"index: {path}"
    yield f"version: {idx.version}"
    yield f"precision: {'nanosecond' if idx.nanosecond else 'microsecond'}"
    yield f"link type: {idx.linktype}"
    yield f"packets: {idx.count}"
    yield f"first: {h['first']} ({h['first_epoch']})"
    yield f"last: {h['last']} ({h['last_epoch']})"
    yield f"pcap size: {idx.pcap_size} bytes"
    yield f"flows: {len(idx.flows)}"
    shown = _shown(len(idx.flows), limit)
    for i in range(shown):
        yield f"  flow {i}: {_flow_totals_text(idx, i)}: {describe_flow(idx.flows[i])}"
    if shown < len(idx.flows):
        yield f"  ... {len(idx.flows) - shown} more flows"
    if postings is None:
        yield f"postings: none (index version {idx.version})"
    else:
        yield (f"postings: {postings.keys} keys, {postings.frames_len} bytes in "
               f"{postings.frames} frames, {postings.block_count} time blocks")
        if postings.header.bins:
            start, width, n = time_bins(idx.first_ns, idx.last_ns)
            yield f"time bins: {n} of {width} s from {start} (epoch seconds)"
        shown = _shown(postings.keys, limit)
        for k in range(shown):
            yield f"  key {k}: {describe_key(postings, k)}"
        if shown < postings.keys:
            yield f"  ... {postings.keys - shown} more keys"
    yield "entries:"
    shown = _shown(idx.count, limit)
    for i in range(shown):
        ts = format_time(int(idx.ts_ns[i]), idx.nanosecond)[0]
        yield (
            f"  {i}: {ts} offset {idx.offset[i]} caplen {idx.caplen[i]} "
            f"wirelen {idx.wirelen[i]} flow {idx.flow[i]}"
        )
    if shown < idx.count:
        yield f"  ... {idx.count - shown} more entries"


def flow_totals_record(idx: PacketIndex, i: int) -> dict[str, Any]:
    """Flow i's packets and (version 4, else None) wire bytes, first and last timestamp."""
    totals = (idx.flow_bytes, idx.flow_first_ns, idx.flow_last_ns)
    return {"packets": int(idx.flow_packets[i]),
            **{k: None if t is None else int(t[i])
               for k, t in zip(("bytes", "first_ns", "last_ns"), totals, strict=True)}}


def _flow_totals_text(idx: PacketIndex, i: int) -> str:
    t = flow_totals_record(idx, i)
    if t["bytes"] is None:
        return f"{t['packets']} packets"
    first, last = (format_time(t[k], idx.nanosecond)[0] for k in ("first_ns", "last_ns"))
    return f"{t['packets']} packets, {t['bytes']} bytes, {first} to {last}"


def _json_lines(idx: PacketIndex, path: str, limit: int | None, postings: Postings | None
                ) -> Iterator[str]:
    yield json.dumps({"type": "header", **header_record(idx, path, postings)})
    shown = _shown(len(idx.flows), limit)
    for i in range(shown):
        rec = {"type": "flow", "flow": i, **flow_totals_record(idx, i)}
        yield json.dumps({**rec, **flow_record(idx.flows[i])})
    for k in range(_shown(postings.keys, limit) if postings is not None else 0):
        yield json.dumps({"type": "key", **key_record(postings, k)})
    shown = _shown(idx.count, limit)
    cols = [c[:shown].tolist() for c in (idx.ts_ns, idx.offset, idx.caplen, idx.wirelen, idx.flow)]
    for i, (ts, off, cap, wire, flow) in enumerate(zip(*cols, strict=True)):
        yield json.dumps(
            {"type": "packet", "index": i, "ts_ns": ts, "offset": off, "caplen": cap,
             "wirelen": wire, "flow": flow}
        )


def check(idx_path: str, pcap_path: str) -> tuple[str | None, PacketIndex | None]:
    """(first problem or None, the index when it could be read)."""
    try:
        idx = read_index(idx_path)
    except FormatError as e:
        return str(e), None
    problem = index_problem(idx)
    if problem:
        return f"{idx_path}: {problem}", idx
    try:
        reader = PcapReader(pcap_path)
    except FormatError as e:
        return f"{idx_path}: its pcap is unusable: {e}", idx
    with reader:
        hdr = reader.header
        if hdr.nanosecond != idx.nanosecond or hdr.linktype != idx.linktype:
            return (
                f"{idx_path}: precision/link type ({idx.nanosecond}, {idx.linktype}) differ "
                f"from {pcap_path} ({hdr.nanosecond}, {hdr.linktype})", idx,
            )
        arr = reader.array()
        records = scan_records(arr, hdr)
        problem = records_problem(idx, records)
        if problem:
            del arr
            return f"{idx_path}: {problem} ({pcap_path})", idx
        fresh = index_records(arr, hdr, records)
        del arr
    stored = idx.flows[idx.flow].view(np.dtype((np.void, FLOW_DTYPE.itemsize)))
    fresh_rows = flows_as_version(fresh.flows, idx.version)[fresh.flow]
    actual = fresh_rows.view(np.dtype((np.void, FLOW_DTYPE.itemsize)))
    diff = np.flatnonzero(stored != actual)
    if len(diff):
        i = int(diff[0])
        return (
            f"{idx_path}: entry {i}: flow {idx.flow[i]} ({describe_flow(idx.flows[idx.flow[i]])})"
            f" does not match the packet ({describe_flow(fresh_rows[i])})", idx,
        )
    try:
        stored_postings = read_postings(idx_path)
    except NoPostings:
        return None, idx  # written before postings existed: nothing more to compare
    except FormatError as e:
        return str(e), idx
    problem = postings_problem(stored_postings, build_postings(fresh))
    return (f"{idx_path}: {problem} ({pcap_path})" if problem else None), idx


def _default_pcap(idx_path: str) -> str:
    if not idx_path.endswith(".idx") or idx_path.endswith("/.idx"):
        raise click.UsageError(f"cannot tell the pcap of {idx_path} (no .idx suffix): use --pcap")
    return idx_path[: -len(".idx")]


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  npcapprintindex -i 1763737200.123456.pcap.idx -n 20      # header, summary, 20 entries
  npcapprintindex -i 1763737200.123456.pcap.idx -j | jq .   # JSON lines
  npcapprintindex -i 1763737200.123456.pcap.idx -T          # first/last timestamps only
  npcapprintindex -c -i 1763737200.123456.pcap.idx          # check against its pcap
""",
)
@click.version_option(package_name="pcapvault", prog_name="npcapprintindex")
@click.option("-i", "idx_path", required=True, metavar="FILE.idx", help="index to read")
@click.option("-n", "limit", type=click.IntRange(min=0), default=None,
              help="show at most N flows and N packet entries")
@click.option("-j", "as_json", is_flag=True, help="JSON lines: header, flows, packets")
@click.option("-T", "times_only", is_flag=True, help="first and last timestamps only")
@click.option("-c", "check_mode", is_flag=True,
              help="check the index against its pcap; exit 1 naming the first problem")
@click.option("--pcap", "pcap_path", default=None, metavar="FILE",
              help="pcap for -c (default: the index path without .idx)")
def command(
    idx_path: str, limit: int | None, as_json: bool, times_only: bool, check_mode: bool,
    pcap_path: str | None,
) -> None:
    """Print a pcapvault index, or check it with -c."""
    if check_mode:
        problem, idx = check(idx_path, pcap_path or _default_pcap(idx_path))
        if problem:
            click.echo(f"{PROG}: {' '.join(problem.split())}", err=True)
            raise click.exceptions.Exit(EXIT_PROBLEM)
        assert idx is not None
        click.echo(f"{idx_path}: OK ({idx.count} packets, {len(idx.flows)} flows)")
        return
    if pcap_path:
        raise click.UsageError("--pcap only goes with -c")
    if times_only:
        idx = read_index(idx_path, packets=False)
        h = header_record(idx, idx_path)
        if as_json:
            click.echo(json.dumps({k: h[k] for k in ("first", "first_epoch", "last",
                                                     "last_epoch")}))
        else:
            click.echo(f"first: {h['first']} ({h['first_epoch']})")
            click.echo(f"last: {h['last']} ({h['last_epoch']})")
        return
    idx = read_index(idx_path, packets=True)
    try:
        postings: Postings | None = Postings.read(idx_path)
    except NoPostings:
        postings = None
    try:
        lines = (_json_lines if as_json else _text_lines)(idx, idx_path, limit, postings)
        out = sys.stdout
        while batch := list(itertools.islice(lines, 4096)):
            out.write("\n".join(batch) + "\n")
        out.flush()
    finally:
        if postings is not None:
            postings.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point: an unreadable index is one line on stderr and exit status 2."""
    run(command, PROG, error_code=EXIT_BAD_INPUT, args=argv)


if __name__ == "__main__":
    main()
