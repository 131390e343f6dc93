"""npcapserve's status and metrics follow a live recorder on a veth pair in a namespace."""

from __future__ import annotations

import signal
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from recorderproc import RecorderProc, read_stats, synthetic_pcap

from pcapvault.server.status import StatusCollector, dumpset_status


def scrape(ds) -> dict[str, float]:
    """name{interface} -> value, parsed with prometheus-client's own parser."""
    reg = CollectorRegistry()
    reg.register(StatusCollector((str(ds),)))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            assert s.labels["interface"] == "pvrx" and s.labels["dumpset"] == str(ds)
            out[s.name] = s.value
    return out


def wait_for(cond, timeout: float = 15.0):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_metrics_follow_a_live_recorder(veth, tmp_path):
    ds = tmp_path / "ds"
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 300, 200)
    rec = RecorderProc(veth, ds, "--stats-interval", "0.2", "--disk-limit", "1GB")
    try:
        first = wait_for(lambda: (m := scrape(ds)).get("pcapvault_recorder_up") == 1 and m)
        assert first["pcapvault_disk_budget_bytes"] == 1 << 30
        assert first.get("pcapvault_packets_written_total", 0) == 0
        veth.send([src])
        m = wait_for(lambda: (m := scrape(ds))["pcapvault_packets_written_total"] >= 300 and m)
        assert m["pcapvault_packets_written_total"] == 300
        assert m["pcapvault_packets_received_total"] == 300
        assert m["pcapvault_packets_dropped_total"] == 0
        assert m["pcapvault_bytes_written_total"] == 300 * (200 + 16)
        assert m["pcapvault_files"] == 0  # still in the file being written
        rec.signal(signal.SIGUSR1)  # closed, indexed, linked
        # Linked first, then counted as done at the recorder's next stats write.
        m = wait_for(lambda: (m := scrape(ds))["pcapvault_files"] == 1
                     and m["pcapvault_files_pending_index"] == 0
                     and "pcapvault_last_indexed_age_seconds" in m and m)
        assert 0 <= m["pcapvault_last_indexed_age_seconds"] < 15
        assert 0 <= m["pcapvault_oldest_packet_age_seconds"] < 60
        veth.send([src])
        m = wait_for(lambda: (m := scrape(ds))["pcapvault_packets_written_total"] >= 600 and m)
        assert m["pcapvault_packets_written_total"] == 600
        assert m["pcapvault_disk_bytes"] >= 300 * 216
        st = dumpset_status(str(ds))
        assert st["interface"] == "pvrx" and st["files"] == 1 and st["recorder_up"]
        assert st["packets_written"] == 600 and st["budget_bytes"] == 1 << 30
        assert st["first_packet"] is not None and st["last_packet"] >= st["first_packet"]
        assert int(read_stats(ds)["packets_written"]) == 600
    finally:
        assert rec.stop() == 0, rec.stderr


def test_status_of_an_unusable_dump_set(tmp_path):
    st = dumpset_status(str(tmp_path / "missing"))
    assert "does not exist" in st["error"]
    reg = CollectorRegistry()
    reg.register(StatusCollector((str(tmp_path / "missing"),)))
    text = generate_latest(reg).decode()
    assert [s for f in text_string_to_metric_families(text) for s in f.samples] == []
