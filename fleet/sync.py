"""npcapfleet sync: each sensor's files indexed since the last sync into the catalogue.

Sensors are asked concurrently (SENSORS_AT_ONCE at a time, pages of files through a small
queue) and the catalogue is written from this thread only. Per page: rows of files the catalogue has
already (a file indexed again) are deleted first, then the page's rows inserted, then the
dump set's cursor moves on; so a sync stopped halfway repeats at most a page. After a dump
set's last page, the files the sensor no longer names are deleted from the catalogue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from pcapvault.index.jsonvalues import whole

from .rows import canonical
from .sensors import SensorClient, SensorError
from .store import CONVERSATION_COLUMNS, DUMPSET_COLUMNS, FILE_COLUMNS, VIEWS, Store

# A time the catalogue takes: its days are Dates (up to 2149); a sensor's times are past 1970.
LATEST_NS = 5_600_000_000 * 10**9
PAGE_FILES = 50  # files per request: a page of summaries stays a few MB
SENSORS_AT_ONCE = 16  # sensors asked at the same time


@dataclass
class Synced:
    """What one sync did for one sensor dump set (or why a sensor failed)."""

    sensor: str
    dumpset: str = ""
    added: int = 0  # files new or indexed again
    removed: int = 0
    conversations: int = 0
    error: str | None = None


@dataclass
class Page:
    """One answer of a sensor's /api/v1/catalogue, and whether it ends its dump set's list.
    Each of its files holds `rows`: its conversations' canonical columns (rows.canonical)
    and their views' numbers (`view`)."""

    sensor: str
    position: int
    answer: dict
    last: bool


def checked(answer: dict) -> dict:
    """The answer with each file's conversations in canonical columns; KeyError,
    TypeError or ValueError for an answer no sensor of this version sends."""
    for key in ("dumpset", "interface", "cursor"):
        if not isinstance(answer[key], str):
            raise TypeError(f"{key} is not text")
    for key in ("linktype", "snaplen"):
        whole(answer[key], key, 0, (1 << 32) - 1)
    answer["names"] = [str(n) for n in answer["names"]]
    answer["more"] = bool(answer["more"])
    answer["nanosecond"] = bool(answer["nanosecond"])
    for f in answer["files"]:
        f["name"] = str(f["name"])
        for key in ("first_ns", "last_ns", "index_mtime_ns", "packets"):
            whole(f[key], key, 0, LATEST_NS - 1)
        c = f.pop("conversations")
        f["rows"] = rows = canonical(c)
        rows["view"] = [VIEWS[v] for v in c["view"]]
        if len(rows["view"]) != len(rows["addr_lo"]):
            raise ValueError("columns of different lengths")
    return answer


@dataclass
class _Failed:
    sensor: str
    error: str


def day(ns: int) -> date:
    """The UTC day of a time, the catalogue's partition (a date: clickhouse-connect writes
    a Date column from one)."""
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).date()


def cursors(store: Store) -> dict[tuple[str, str], str]:
    """Each sensor dump set's cursor: where its next sync starts."""
    rows = store.query(f"SELECT sensor, dumpset, cursor FROM {store.db}.dumpsets FINAL")
    return {(s, d): c for s, d, c in rows}


def sync(store: Store, clients: list[SensorClient], note: Callable[[Synced], None]
         ) -> list[Synced]:
    """Sync every sensor of `clients`; `note` hears of each dump set (or sensor) when done."""
    since = cursors(store)
    pages: queue.Queue = queue.Queue(maxsize=2 * len(clients) + 2)
    at_once = threading.BoundedSemaphore(SENSORS_AT_ONCE)

    def pull(client: SensorClient) -> None:
        with at_once:
            pull_all(client)

    def pull_all(client: SensorClient) -> None:
        try:
            for position, d in enumerate(client.dumpsets()):
                cursor = since.get((client.name, d["path"]), "")
                while True:
                    answer = checked(client.catalogue(d["path"], cursor, PAGE_FILES))
                    pages.put(Page(client.name, position, answer, not answer["more"]))
                    if not answer["more"]:
                        break
                    cursor = answer["cursor"]
        except SensorError as e:
            pages.put(_Failed(client.name, str(e)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            pages.put(_Failed(client.name, f"{client.name}: unexpected answer ({e!r:.200})"))
        finally:
            pages.put(None)

    # Daemon threads (not a pool's): a catalogue error here ends the run at once, never
    # waiting for a thread blocked on the full queue.
    for c in clients:
        threading.Thread(target=pull, args=(c,), daemon=True, name=f"sync-{c.name}").start()
    done: list[Synced] = []
    current: dict[tuple[str, str], Synced] = {}
    running = len(clients)
    while running:
        item = pages.get()
        if item is None:
            running -= 1
        elif isinstance(item, _Failed):
            s = Synced(item.sensor, error=item.error)
            done.append(s)
            note(s)
        else:
            key = (item.sensor, item.answer["dumpset"])
            s = current.setdefault(key, Synced(*key))
            store_page(store, item, s)
            if item.last:
                done.append(current.pop(key))
                note(s)
    return done


def store_page(store: Store, page: Page, s: Synced) -> None:
    """Replace the page's files' rows, drop the files the last page no longer names, and
    move the dump set's cursor on."""
    a = page.answer
    sensor, dumpset, db = page.sensor, a["dumpset"], store.db
    names = [f["name"] for f in a["files"]]
    where = "sensor = {s:String} AND dumpset = {d:String}"
    params = {"s": sensor, "d": dumpset}
    if names:
        known = store.query(f"SELECT DISTINCT file FROM {db}.files WHERE {where} AND "
                            "file IN {names:Array(String)}", {**params, "names": names})
        if known:
            _delete(store, sensor, dumpset, [k[0] for k in known])
    files = []
    conversations: dict[str, list] = {k: [] for k in CONVERSATION_COLUMNS}
    for f in a["files"]:
        r, n = f["rows"], len(f["rows"]["addr_lo"])
        d = day(f["first_ns"])
        for k, v in (("day", d), ("sensor", sensor), ("dumpset", dumpset), ("file", f["name"])):
            conversations[k] += [v] * n
        for k in CONVERSATION_COLUMNS[4:]:
            conversations[k] += r[k]
        in_rows = sum(r["packets_lo_hi"]) + sum(r["packets_hi_lo"])
        files.append((d, sensor, dumpset, f["name"], f["first_ns"], f["last_ns"],
                      f["index_mtime_ns"], f["packets"], max(f["packets"] - in_rows, 0)))
    store.insert("conversations", CONVERSATION_COLUMNS,
                 [conversations[k] for k in CONVERSATION_COLUMNS], column_oriented=True)
    store.insert("files", FILE_COLUMNS, files)
    s.added += len(files)
    s.conversations += len(conversations["addr_lo"])
    if page.last:
        held = set(a["names"])
        ours = [r[0] for r in store.query(f"SELECT DISTINCT file FROM {db}.files WHERE {where}",
                                          params)]
        gone = [n for n in ours if n not in held]
        if gone:
            _delete(store, sensor, dumpset, gone)
        s.removed = len(gone)
    store.insert("dumpsets", DUMPSET_COLUMNS, [(
        sensor, dumpset, page.position, a["interface"], a["linktype"], a["snaplen"],
        int(a["nanosecond"]), a["cursor"], time.time_ns())])


def _delete(store: Store, sensor: str, dumpset: str, names: list[str]) -> None:
    for table in ("conversations", "files"):
        store.command(f"DELETE FROM {store.db}.{table} WHERE sensor = {{s:String}} AND "
                      "dumpset = {d:String} AND file IN {names:Array(String)}",
                      {"s": sensor, "d": dumpset, "names": names})
