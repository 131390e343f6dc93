"""The extraction request: what an analyst asks npcapextract for, in one type.

The command line builds it once from its options; the client sends it to the extraction
service (service/wire.py adds only the password and the transport's choice of shared
buffers), and the service runs and audits it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Request:
    """Packets of [begin_ns, end_ns) matching `filter` in `dumpsets`, and how to write them."""

    dumpsets: list[str]
    begin_ns: int
    end_ns: int
    filter: str = ""
    pcapng: bool = False
    snaplen: int | None = None
    max_bytes: int | None = None
    max_packets: int | None = None
    split_bytes: int | None = None
    split_packets: int | None = None
    empty: bool = False
    list_only: bool = False
    # A table of the window's traffic instead of its packets (npcapflows through the
    # service): "conversation", "endpoint" or "port", its order and how many rows.
    table: str | None = None
    table_sort: str = "bytes"
    table_limit: int | None = None

    def chosen_options(self) -> dict:
        """The output options set to something other than their default (for the audit)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("dumpsets", "begin_ns", "end_ns", "filter") and v
                and (self.table or not k.startswith("table_"))}
