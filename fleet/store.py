"""The catalogue's storage: one SQL schema, run by ClickHouse in process (chdb) for one
machine or a test, or by a ClickHouse server (clickhouse-connect) for a fleet.

Both take the same statements with the same `{name:Type}` query parameters (bound by
ClickHouse, never pasted into the text), so nothing above this module knows which one runs.
The tables (docs/FLEET.md):

- `files`: one row per sensor file: its span, packets, and the packets no conversation row
  holds (ARP and other non-IP frames), for `npcapfleet pcap`'s choice of sensors.
- `conversations`: the conversations of each file alone (server/catalogue.py), with both
  ends in a canonical order (the lower address and port first) so rows of many files and
  sensors sum by plain GROUP BY; `a_is_lo` remembers which end sent the file's first packet.
- `dumpsets`: per sensor dump set, what a pcapng interface block needs and the sync cursor.

Partitioned by the day of the file's first packet (a file never crosses midnight UTC: files
end at 10-minute slots), ordered by the lower address so a host look-up reads a few granules,
with a bloom filter on the higher address and a TTL of `retention_days`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Sequence
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pcapvault.index.errors import PcapVaultError

from .config import ClickHouse

CONVERSATION_COLUMNS = (
    "day", "sensor", "dumpset", "file", "view", "ipver", "protocol", "ported",
    "addr_lo", "port_lo", "addr_hi", "port_hi", "packets_lo_hi", "bytes_lo_hi",
    "packets_hi_lo", "bytes_hi_lo", "a_is_lo", "first_ns", "last_ns")
FILE_COLUMNS = ("day", "sensor", "dumpset", "file", "first_ns", "last_ns", "index_mtime_ns",
                "packets", "other_packets")
# How libpcap's primitives see a row's packets (server/catalogue.py's VIEWS, filters.py).
VIEWS = {"ip": 0, "tagged": 1, "ip6ext": 2}
DUMPSET_COLUMNS = ("sensor", "dumpset", "position", "interface", "linktype", "snaplen",
                   "nanosecond", "cursor", "synced_ns")


def schema(db: str, retention_days: int) -> list[str]:
    """The statements that create the catalogue (idempotent). `db` is checked by the config
    (a plain name) and `retention_days` is an int: neither is user text."""
    ttl = f"TTL day + INTERVAL {int(retention_days)} DAY"
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"""CREATE TABLE IF NOT EXISTS {db}.conversations (
            day Date, sensor LowCardinality(String), dumpset LowCardinality(String),
            file String, view UInt8, ipver UInt8, protocol LowCardinality(String),
            ported UInt8, addr_lo IPv6, port_lo UInt16, addr_hi IPv6, port_hi UInt16,
            packets_lo_hi UInt64, bytes_lo_hi UInt64, packets_hi_lo UInt64,
            bytes_hi_lo UInt64, a_is_lo UInt8, first_ns Int64, last_ns Int64,
            INDEX addr_hi_bloom addr_hi TYPE bloom_filter GRANULARITY 4,
            INDEX first_minmax first_ns TYPE minmax GRANULARITY 4
        ) ENGINE = MergeTree PARTITION BY day ORDER BY (addr_lo, addr_hi, first_ns) {ttl}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.files (
            day Date, sensor LowCardinality(String), dumpset LowCardinality(String),
            file String, first_ns Int64, last_ns Int64, index_mtime_ns Int64,
            packets UInt64, other_packets UInt64
        ) ENGINE = MergeTree PARTITION BY day ORDER BY (sensor, dumpset, first_ns) {ttl}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.dumpsets (
            sensor LowCardinality(String), dumpset String, position UInt32,
            interface String, linktype UInt32, snaplen UInt32, nanosecond UInt8,
            cursor String, synced_ns Int64
        ) ENGINE = ReplacingMergeTree(synced_ns) ORDER BY (sensor, dumpset)""",
    ]


INSERT_ROWS = 50_000  # rows per INSERT statement into chdb
LOCK_WAIT_S = 60.0  # how long a chdb catalogue in use by another process is waited for


class StoreError(PcapVaultError):
    """The catalogue cannot be opened, created or queried."""


class Store(Protocol):
    """What the fleet needs of ClickHouse: statements and queries with bound parameters, and
    inserts of rows (sequences in `columns` order)."""

    db: str

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]: ...

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence],
               column_oriented: bool = False) -> None: ...

    def close(self) -> None: ...


class ChdbStore:
    """ClickHouse in this process (chdb), its data in the directory `path`."""

    def __init__(self, path: str, db: str = "pcapvault"):
        try:
            from chdb import session
        except ImportError:
            raise StoreError("chdb is not installed: install pcapvault[fleet] (./setup.sh "
                             "--fleet), or give an https:// catalogue") from None
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the catalogue {path}: {e.strerror}") from None
        self.lock = _lock(path, LOCK_WAIT_S)
        try:
            self.session = session.Session(path)
        except Exception as e:  # chdb raises its own types, or RuntimeError
            os.close(self.lock)
            raise StoreError(f"cannot open the catalogue in {path}: {e}") from None
        self.db = db
        self.command("SET output_format_json_quote_64bit_integers = 0")  # ints as numbers

    def _run(self, sql: str, params: dict[str, Any] | None, fmt: str = "CSV") -> Any:
        values = {k: _value_text(v) for k, v in (params or {}).items()}
        try:
            return self.session.query(sql, fmt, params=values)
        except Exception as e:
            raise StoreError(f"catalogue: {' '.join(str(e).split())[:500]}") from None

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._run(sql, params)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        res = self._run(sql, params, "JSONCompact")
        data = res.bytes()
        return [tuple(r) for r in json.loads(data)["data"]] if data else []

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence],
               column_oriented: bool = False) -> None:
        """JSONCompactColumns: the values travel as data, never as SQL text (dates and
        addresses as their text), a column at a time (one encoder call for all of it).
        `rows` are columns when `column_oriented`."""
        data = [list(c) for c in rows] if column_oriented else [
            list(c) for c in zip(*rows, strict=True)]
        n = len(data[0]) if data else 0
        for at in range(0, n, INSERT_ROWS):
            part = [_json_column(c[at:at + INSERT_ROWS]) for c in data]
            self._run(f"INSERT INTO {self.db}.{table} ({', '.join(columns)}) "
                      f"FORMAT JSONCompactColumns\n{json.dumps(part, default=str)}", None)

    def close(self) -> None:
        self.session.close()
        os.close(self.lock)


def _lock(path: str, wait_s: float) -> int:
    """An exclusive lock on the catalogue directory `path`, held while this process has it
    open: chdb lets one process at a time open it and tells a second one only "Error
    initializing EmbeddedServer". So a query that meets the timer's sync waits for it,
    up to `wait_s` seconds, then says what is going on."""
    try:
        fd = os.open(os.path.join(path, ".npcapfleet.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"cannot lock the catalogue {path}: {e.strerror}") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StoreError(
                    f"the catalogue {path} is in use by another npcapfleet (a sync?) for more "
                    f"than {wait_s:g} s; try again when it ends (a ClickHouse server "
                    "catalogue serves several at once)") from None
            time.sleep(0.1)


def _json_column(values: list) -> list:
    """A column for json.dumps: a column of dates or addresses as their text, each distinct
    object converted once (a catalogue page repeats its hosts and days thousands of times,
    as the same objects: keyed by identity, which `values` keeps alive, not by a hash
    computed in Python)."""
    if not values or isinstance(values[0], int | float | str | None):
        return values
    texts: dict[int, str] = {}
    return [texts.get(id(v)) or texts.setdefault(id(v), _text(v)) for v in values]


@lru_cache(maxsize=1 << 17)
def _text(value: Any) -> str:
    """A value's text, kept: the next page names mostly the same hosts (printing an IPv6
    address takes several microseconds)."""
    return str(value)


# ClickHouse reads a String parameter in its escaped text form (as clickhouse-connect
# sends them): a backslash starts an escape, a tab or newline would end the value.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _value_text(value: Any) -> Any:
    """A parameter as chdb passes it to ClickHouse: text escaped, other scalars as they are,
    arrays and tuples as ClickHouse's text of a value (ClickHouse parses it as data of the
    declared type)."""
    if isinstance(value, list | tuple):
        inner = ", ".join(_quoted(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return value.translate(_ESCAPES)
    return value


def _quoted(value: Any) -> str:
    if isinstance(value, list | tuple):
        return _value_text(value)
    if isinstance(value, int | float):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


class ServerStore:
    """A ClickHouse server over HTTPS (clickhouse-connect), credentials from the fleet file."""

    def __init__(self, url: str, login: ClickHouse):
        try:
            import clickhouse_connect
        except ImportError:
            raise StoreError("clickhouse-connect is not installed: install pcapvault[fleet] "
                             "(./setup.sh --fleet)") from None
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise StoreError("give the ClickHouse user and password in the fleet file's "
                             "[clickhouse] section, not in the catalogue URL")
        try:
            self.client = clickhouse_connect.get_client(
                host=parts.hostname, port=parts.port or 8443,
                interface="https" if parts.scheme == "https" else "http",
                username=login.user, password=login.password,
                ca_cert=str(login.ca) if login.ca else None)
        except Exception as e:  # clickhouse_connect's errors, OSError
            raise StoreError(f"cannot reach the catalogue at {url}: {e}") from None
        self.db = login.database

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        try:
            self.client.command(sql, parameters=params or None)
        except Exception as e:
            raise StoreError(f"catalogue: {' '.join(str(e).split())[:500]}") from None

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        try:
            return [tuple(r) for r in self.client.query(sql, parameters=params or None)
                    .result_rows]
        except Exception as e:
            raise StoreError(f"catalogue: {' '.join(str(e).split())[:500]}") from None

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence],
               column_oriented: bool = False) -> None:
        data = [list(r) for r in rows]
        if not data or column_oriented and not data[0]:
            return
        try:
            self.client.insert(f"{self.db}.{table}", data, column_names=list(columns),
                               column_oriented=column_oriented)
        except Exception as e:
            raise StoreError(f"catalogue: {' '.join(str(e).split())[:500]}") from None

    def close(self) -> None:
        self.client.close()


def open_store(where: str, login: ClickHouse, retention_days: int) -> Store:
    """The catalogue at `where` (a directory, or https://host:port), created if new."""
    if "://" in where:
        if not where.startswith(("https://", "http://")):
            raise StoreError(f"catalogue {where!r}: give a directory or https://HOST:PORT")
        store: Store = ServerStore(where, login)
    else:
        store = ChdbStore(str(Path(where)), login.database)
    for statement in schema(store.db, retention_days):
        store.command(statement)
    return store
