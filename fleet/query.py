"""What the catalogue answers, and which sensors must be asked instead or as well.

A catalogue row sums one conversation over one file; it answers a window exactly when the
row lies inside it. So, for one sensor dump set, the catalogue answers when

- the filter is one it can express (filters.py),
- the catalogue reaches the window's end (its newest file of that dump set ends after it;
  later files are not synced yet), and
- no matching row straddles the window's begin or end;

otherwise that dump set is asked over its API (/api/v1/conversations, or /api/v1/pcap) and
its rows replace the catalogue's. Sensors never synced are always asked.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import filters
from .rows import BIG, Merged, Row, canonical, mapped, rows_of, table_columns
from .sensors import SensorClient, SensorError
from .store import Store
from .sync import day

DAY_NS = 86400 * 10**9
SENSOR_ROWS = 10000  # what npcapserve answers at most by default (--max-rows)


@dataclass
class Known:
    """A sensor dump set the catalogue knows: its pcapng interface and how far it reaches."""

    sensor: str
    dumpset: str
    position: int
    interface: str
    linktype: int
    snaplen: int
    nanosecond: bool
    reach_ns: int | None  # the newest synced file's last packet


def known(store: Store, sensors: list[str]) -> list[Known]:
    """The configured sensors' dump sets, in the fleet file's order, then the sensor's."""
    db = store.db
    reach = {(s, d): last for s, d, last in store.query(
        f"SELECT sensor, dumpset, max(last_ns) FROM {db}.files WHERE sensor IN "
        "{sensors:Array(String)} GROUP BY sensor, dumpset", {"sensors": sensors})}
    rows = store.query(
        f"SELECT sensor, dumpset, position, interface, linktype, snaplen, nanosecond "
        f"FROM {db}.dumpsets FINAL WHERE sensor IN {{sensors:Array(String)}}",
        {"sensors": sensors})
    out = [Known(s, d, int(p), i, int(lt), int(sl), bool(ns), reach.get((s, d)))
           for s, d, p, i, lt, sl, ns in rows]
    order = {name: n for n, name in enumerate(sensors)}
    return sorted(out, key=lambda k: (order[k.sensor], k.position))


def horizon(retention_days: int, now_ns: int) -> int:
    """The oldest time the catalogue surely keeps: the TTL drops a day once it is
    `retention_days` old."""
    today = now_ns // DAY_NS * DAY_NS
    return today - (retention_days - 1) * DAY_NS


def stale(ks: list[Known], begin_ns: int, end_ns: int, kept_from_ns: int
          ) -> set[tuple[str, str]]:
    """Dump sets the catalogue may not hold all of for the window: synced files that end
    before the window does (later files are not synced yet), or a window reaching back past
    what the TTL keeps."""
    return {(k.sensor, k.dumpset) for k in ks
            if k.reach_ns is None or k.reach_ns < end_ns - 1 or begin_ns < kept_from_ns}


def _window(begin_ns: int, end_ns: int, sensors: list[str]) -> tuple[str, dict[str, Any]]:
    """The partitions and sensors of a window (a file's day is its first packet's)."""
    return ("day BETWEEN {d0:Date} AND {d1:Date} AND sensor IN {sensors:Array(String)}",
            {"d0": day(max(begin_ns - DAY_NS, 0)), "d1": day(max(end_ns, 0)),
             "b": begin_ns, "e": end_ns, "sensors": sensors})


def straddling(store: Store, cond: filters.Conditions, begin_ns: int, end_ns: int,
               sensors: list[str]) -> set[tuple[str, str]]:
    """Dump sets with a row of the window the catalogue cannot sum: a row that may match
    and that the window cuts, or one whose match only the packets can tell."""
    where, params = _window(begin_ns, end_ns, sensors)
    rows = store.query(
        f"SELECT DISTINCT sensor, dumpset FROM {store.db}.conversations WHERE {where} "
        "AND first_ns < {e:Int64} AND last_ns >= {b:Int64} "
        f"AND ((NOT (first_ns >= {{b:Int64}} AND last_ns < {{e:Int64}}) AND "
        f"{cond.possible.text}) OR {cond.unsure.text})",
        {**params, **cond.possible.params})
    return {(s, d) for s, d in rows}


def catalogue_rows(store: Store, cond: filters.Conditions, begin_ns: int, end_ns: int,
                   sensors: list[str], skip: set[tuple[str, str]]) -> list[Row]:
    """Matching conversations inside the window, summed over files and sensors, leaving out
    the dump sets in `skip`."""
    where, params = _window(begin_ns, end_ns, sensors)
    if skip:
        where += " AND (sensor, dumpset) NOT IN {skip:Array(Tuple(String, String))}"
        params["skip"] = sorted(skip)
    rows = store.query(
        "SELECT protocol, ported, ipver, IPv6NumToString(addr_lo), port_lo, "
        "IPv6NumToString(addr_hi), port_hi, sum(packets_lo_hi), sum(bytes_lo_hi), "
        "sum(packets_hi_lo), sum(bytes_hi_lo), min(first_ns), max(last_ns), "
        f"min(if(a_is_lo = 1, first_ns, {BIG})), min(if(a_is_lo = 1, {BIG}, first_ns)) "
        f"FROM {store.db}.conversations WHERE {where} "
        "AND first_ns >= {b:Int64} AND last_ns < {e:Int64} AND " + cond.match.text +
        " GROUP BY protocol, ported, ipver, addr_lo, port_lo, addr_hi, port_hi",
        {**params, **cond.match.params})
    return [Row(p, bool(pt), int(v), mapped(lo), int(plo), mapped(hi), int(phi), *map(int, n))
            for p, pt, v, lo, plo, hi, phi, *n in rows]


def candidates(store: Store, node: filters.Node | None, expressible: bool, begin_ns: int,
               end_ns: int, sensors: list[str]) -> set[tuple[str, str]]:
    """Dump sets whose synced files may hold packets of the window matching the filter."""
    where, params = _window(begin_ns, end_ns, sensors)
    overlap = " AND first_ns < {e:Int64} AND last_ns >= {b:Int64}"
    found: set[tuple[str, str]] = set()
    if expressible:
        cond = filters.conditions(node).possible
        found |= {(s, d) for s, d in store.query(
            f"SELECT DISTINCT sensor, dumpset FROM {store.db}.conversations WHERE {where}"
            + overlap + " AND " + cond.text, {**params, **cond.params})}
        if filters.evaluate(node, "other") is False:
            return found
        where += " AND other_packets > 0"
    found |= {(s, d) for s, d in store.query(
        f"SELECT DISTINCT sensor, dumpset FROM {store.db}.files WHERE {where}" + overlap,
        params)}
    return found


@dataclass
class FleetTable:
    """Conversations of the fleet, and how they were found."""

    conversations: list[dict]
    asked: dict[str, list[str] | None]  # sensor -> dump sets asked over the API (None: all)
    failed: list[str] = field(default_factory=list)  # messages of sensors that failed
    warnings: list[str] = field(default_factory=list)


def conversations(store: Store, names: list[str], client: Callable[[str], SensorClient],
                  expr: str, begin_ns: int, end_ns: int, kept_from_ns: int) -> FleetTable:
    """The fleet's conversations of [begin_ns, end_ns) matching `expr` on the sensors
    `names`: the catalogue's where exact, the sensors' elsewhere (`client(name)` connects
    to one; those asked are asked concurrently), summed. `kept_from_ns`: see horizon()."""
    try:
        node = filters.parse(expr)
        expressible = True
    except filters.NotExpressible:
        node, expressible = None, False
    ds = known(store, names)
    ask: dict[str, list[str] | None] = {n: None for n in names}  # never synced: all
    for k in ds:
        ask[k.sensor] = []
    merged = Merged()
    if expressible:
        cond = filters.conditions(node)
        cut = straddling(store, cond, begin_ns, end_ns, names)
        skip = cut | stale(ds, begin_ns, end_ns, kept_from_ns)
        for k in ds:
            if (k.sensor, k.dumpset) in skip:
                ask[k.sensor].append(k.dumpset)  # type: ignore[union-attr]
        for r in catalogue_rows(store, cond, begin_ns, end_ns, names, skip):
            merged.add(r)
    else:
        for k in ds:
            ask[k.sensor].append(k.dumpset)  # type: ignore[union-attr]
    asked = {n: d for n, d in ask.items() if d is None or d}
    table = FleetTable([], asked)

    def one(name: str) -> dict:
        with client(name) as c:
            return c.conversations(begin_ns, end_ns, expr, asked[name] or [], SENSOR_ROWS)

    with ThreadPoolExecutor(max(len(asked), 1), thread_name_prefix="fleet-ask") as pool:
        futures = [(name, pool.submit(one, name)) for name in asked]
        for name, fut in futures:
            try:
                answer = fut.result()
            except SensorError as e:
                table.failed.append(str(e))
                continue
            try:  # a sensor's answer is checked as any input is
                rows = rows_of(canonical(table_columns(answer["rows"])))
                total = int(answer["total_rows"])
                warnings = [f"{name}: {w}" for w in answer.get("warnings", [])]
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                table.failed.append(f"{name}: unexpected answer ({e!r:.200})")
                continue
            if total > len(rows):
                table.failed.append(
                    f"{name}: {total} conversations, of which the sensor sends {len(rows)} "
                    "(its --max-rows); the rest are missing")
            table.warnings += warnings
            for r in rows:
                merged.add(r)
    table.conversations = merged.conversations()
    return table
