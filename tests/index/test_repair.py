"""npcaprepair: crashes and damage are repaired without losing a complete packet, idempotently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from dumpsets import BASE_NS, all_packets, assert_clean, make_dumpset, repair
from indexes import with_crc
from recorderproc import RecorderProc, one_line, read_pcap, synthetic_pcap, tool

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.indexfile import read_index, write_index


def test_consistent_dump_set_needs_nothing(tmp_path):
    make_dumpset(tmp_path / "ds")
    assert_clean(tmp_path / "ds")


def damage_truncated_index(ds: DumpSet) -> None:
    sf = ds.files()[1]
    os.truncate(sf.index, sf.index.stat().st_size // 2)


def damage_flipped_index_byte(ds: DumpSet) -> None:
    sf = ds.files()[0]
    data = bytearray(sf.index.read_bytes())
    data[len(data) - 5] ^= 0x40
    sf.index.write_bytes(bytes(data))


def damage_deleted_link(ds: DumpSet) -> None:
    sf = ds.files()[2]
    (timeline.slot_dir(ds.timeline, sf.slot) / sf.name).unlink()


def damage_dangling_link(ds: DumpSet) -> None:
    d = timeline.slot_dir(ds.timeline, timeline.slot_of(BASE_NS // 10**9 - 3600))
    d.mkdir(parents=True)
    os.symlink("../../../../../../gone/1763733400.000000.pcap", d / "1763733400.000000.pcap")


def damage_torn_pcap(ds: DumpSet) -> None:
    sf = ds.files()[1]
    os.truncate(sf.pcap, sf.pcap.stat().st_size - 9)


def damage_leftover_temp(ds: DumpSet) -> None:
    sf = ds.files()[2]
    os.rename(sf.pcap, ds.temp_path(77))
    os.unlink(sf.index)


def damage_flipped_record_caplen(ds: DumpSet) -> None:
    """One bit of one stored record's caplen (the file keeps its size, the index its CRC):
    extraction would copy that header with the index's length."""
    sf = ds.files()[1]
    at = 24 + 20 * (16 + 54)  # record 20: every frame of make_dumpset is 54 bytes
    with open(sf.pcap, "r+b") as f:
        f.seek(at + 8)
        assert struct.unpack("<I", f.read(4))[0] == 54
        f.seek(at + 8)
        f.write(struct.pack("<I", 54 ^ 0x400))


def damage_foreign_index(ds: DumpSet) -> None:
    """Another file's index, of a pcap of the same size: its checksum holds."""
    files = ds.files()
    files[1].index.write_bytes(files[0].index.read_bytes())


def damage_index_disagrees(ds: DumpSet) -> None:
    """An index entry that says another wire length than its record (checksum recomputed)."""
    sf = ds.files()[2]
    idx = read_index(sf.index)
    idx.wirelen = idx.wirelen.copy()
    idx.wirelen[5] += 1
    write_index(sf.index, idx)


def _pcap_header_field(name: str, at: int, value: int):
    def damage(ds: DumpSet) -> None:
        with open(ds.files()[1].pcap, "r+b") as f:
            f.seek(at)
            f.write(struct.pack("<I", value))
    damage.__name__ = name  # the test's id
    return damage


# A pcap's own header damaged (the dump set's fuzzer, mutations 72 and 130 of seed 3, 95 of
# seed 3): a magic nobody reads made the file "not a pcap", removed with its 50 packets; a
# link type or a snapshot length below the records' (tcpdump cuts them) was left alone, and
# extraction skipped the file for good.
damage_pcap_magic = _pcap_header_field("damage_pcap_magic", 0, 0)
damage_pcap_link_type = _pcap_header_field("damage_pcap_link_type", 20, 0)
damage_pcap_snaplen = _pcap_header_field("damage_pcap_snaplen", 16, 20)
HEADERS = (damage_pcap_magic, damage_pcap_link_type, damage_pcap_snaplen)


@pytest.mark.parametrize("damage", [
    damage_truncated_index, damage_flipped_index_byte, damage_deleted_link,
    damage_dangling_link, damage_torn_pcap, damage_leftover_temp,
    damage_flipped_record_caplen, damage_foreign_index, damage_index_disagrees, *HEADERS,
])
def test_damage_is_repaired(tmp_path, damage):
    ds = make_dumpset(tmp_path / "ds")
    before = all_packets(tmp_path / "ds")
    damage(ds)
    if damage in (damage_truncated_index, damage_flipped_index_byte):
        sf = ds.files()[1 if damage is damage_truncated_index else 0]
        c = subprocess.run([tool("npcapprintindex"), "-c", "-i", str(sf.index)],
                           capture_output=True, text=True)
        assert c.returncode != 0 and c.stdout.strip() + c.stderr.strip()
    dry = repair(tmp_path / "ds", "--dry-run")
    assert "would " in dry.stdout
    r = repair(tmp_path / "ds")
    assert "change(s) made" in r.stdout, r.stdout
    assert_clean(tmp_path / "ds")
    r2 = repair(tmp_path / "ds")
    assert "nothing to repair" in r2.stdout
    after = all_packets(tmp_path / "ds")
    if damage is damage_flipped_record_caplen:
        assert "restore record headers" in r.stdout and "first at byte 1424" in r.stdout
        assert "truncate" not in r.stdout  # the packets after the damaged header are whole
    if damage in (damage_foreign_index, damage_index_disagrees):
        assert "rebuild index" in r.stdout
    if damage in HEADERS:
        assert "restore pcap header" in r.stdout and "rebuild" not in r.stdout, r.stdout
        assert ds.files()[1].pcap.read_bytes()[:24] == ds.files()[0].pcap.read_bytes()[:24]
    if damage is damage_torn_pcap:
        # Only the torn record goes: it was never complete on disk.
        assert len(after) == len(before) - 1 and set(after) <= set(before)
    else:
        assert after == before
    assert not list(ds.timeline.rglob("1763733400*")), "dangling link and empty slots removed"


def test_an_index_whose_pcap_is_gone_is_removed(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    sf = ds.files()[1]
    sf.pcap.unlink()  # a stop between a deletion's unlinks
    before = all_packets(tmp_path / "ds")
    assert "index of a pcap that is gone" in repair(tmp_path / "ds", "--dry-run").stdout
    assert sf.index.exists()
    r = repair(tmp_path / "ds")
    assert "index of a pcap that is gone" in r.stdout and not sf.index.exists()
    assert_clean(tmp_path / "ds")
    assert all_packets(tmp_path / "ds") == before


def test_upgrade_rewrites_older_index_versions(tmp_path):
    """Indexes of older format versions are sound: a repair leaves them; --upgrade rewrites
    them as the current version (the same index, with the newer parts: version 5's bins)."""
    from indexes import as_version

    from pcapvault.index.postings import VERSION, parse_header

    root = tmp_path / "ds"
    make_dumpset(root)
    files = DumpSet.open(root).files()
    current = {sf.index: sf.index.read_bytes() for sf in files}
    for sf, version in zip(files, (3, 4), strict=False):
        sf.index.write_bytes(as_version(current[sf.index], version))
    older = {sf.index: sf.index.read_bytes() for sf in files}

    def versions() -> list[int]:
        return [parse_header(sf.index.read_bytes(), "x").version for sf in files]

    assert versions()[:2] == [3, 4] and set(versions()[2:]) == {VERSION}
    assert "nothing to repair" in repair(root).stdout  # sound: never rewritten unasked
    assert {sf.index: sf.index.read_bytes() for sf in files} == older
    r = repair(root, "--upgrade", "--dry-run")
    assert r.stdout.count("index format version") == 2 and versions()[:2] == [3, 4]
    r = repair(root, "--upgrade")
    assert "index format version 3; upgraded to version 5" in r.stdout, r.stdout
    assert "index format version 4; upgraded to version 5" in r.stdout
    assert {sf.index: sf.index.read_bytes() for sf in files} == current
    assert_clean(root)


def test_kill_9_mid_file_then_repair(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 6000, 700)
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "1M", "--disk-limit", "1GB")
    sent = veth.send([src])
    time.sleep(1.5)  # at least one aligned flush of the current file
    rec.signal(signal.SIGKILL)
    rec.wait()
    ds = DumpSet.open(tmp_path / "ds")
    temps = ds.temp_files()
    assert len(temps) == 1
    # What is complete on disk at the moment of the kill, read independently.
    on_disk = all_packets(tmp_path / "ds") + read_pcap(temps[0], torn_ok=True)
    assert len(on_disk) > 1000 and [f for _, f, _ in on_disk] == sent[: len(on_disk)]
    r = repair(tmp_path / "ds")
    assert "finalise" in r.stdout
    assert_clean(tmp_path / "ds")
    assert "nothing to repair" in repair(tmp_path / "ds").stdout
    first, last = on_disk[0][0], on_disk[-1][0]
    out = tmp_path / "all.pcap"
    x = subprocess.run([tool("npcapextract"), "-t", str(tmp_path / "ds"),
                        "-b", f"{first / 1e9 - 1:.6f}", "-e", f"{last / 1e9 + 1:.6f}",
                        "-o", str(out)], capture_output=True, text=True)
    assert x.returncode == 0, x.stderr
    assert read_pcap(out) == on_disk


def test_dry_run_on_a_live_dump_set(veth, tmp_path):
    """`npcaprepair -n` while a recorder writes: it sees the lock and says so, and does not
    call the file being written a leftover to remove or finalise."""
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 300, 200)
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "1M")
    try:
        veth.send([src])
        time.sleep(0.5)
        assert DumpSet.open(tmp_path / "ds").temp_files(), "the recorder has a file open"
        r = repair(tmp_path / "ds", "--dry-run")
        assert "is live" in r.stdout and ".rec-" not in r.stdout, r.stdout
        real = subprocess.run([tool("npcaprepair"), str(tmp_path / "ds")], capture_output=True,
                              text=True, timeout=60)
        assert real.returncode == 1 and "is writing to" in real.stderr
    finally:
        assert rec.stop() == 0
    # Stopped: the lock is gone, and the dump set is consistent.
    r = repair(tmp_path / "ds", "--dry-run")
    assert "is live" not in r.stdout and "nothing to repair" in r.stdout, r.stdout


def test_root_repairs_as_the_dump_sets_owner(request):
    """What npcaprepair writes (a rebuilt index, links, directories) belongs to the dump set's
    owner, not to root: the service refuses files of others and the budget could not delete
    them."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = Path(tempfile.mkdtemp(prefix="pv-repair-", dir="/tmp"))  # searchable by 65534
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base))
    ds = make_dumpset(base / "ds")
    subprocess.run(["chown", "-hR", "65534:65534", str(ds.root)], check=True)
    sf = ds.files()[1]
    sf.index.unlink()
    timeline.unlink(ds.timeline, sf.slot, sf.name)
    repair(ds.root)
    assert sf.index.exists()
    made = [sf.index, *(p for p in ds.timeline.rglob("*") if sf.name in p.name)]
    assert len(made) == 3  # the index and the two links
    assert {p.lstat().st_uid for p in made} == {65534}


def test_a_dump_set_whose_timeline_is_gone_is_not_called_consistent(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    marker = json.loads((ds.root / ".pcapvault").read_text())
    marker["timeline"] = str(tmp_path / "nowhere")
    (ds.root / ".pcapvault").write_text(json.dumps(marker))
    r = subprocess.run([tool("npcaprepair"), str(ds.root)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"npcaprepair: error: {ds.root}: its timeline {tmp_path / 'nowhere'} does not exist; "
        "start the recorder on it (with -A DIR for a timeline elsewhere) to give it one: the "
        "start links every file into it\n")


def test_an_index_whose_last_packet_is_before_its_first_is_rebuilt(tmp_path):
    """A header with last_ns < first_ns (its CRC checks) gave a negative count of time bins,
    hence a huge frame table: struct.error in npcapprintindex, npcapextract, npcaprepair."""
    ds = make_dumpset(tmp_path / "ds")
    sf = ds.files()[1]
    data = sf.index.read_bytes()
    last = struct.unpack_from("<q", data, 32)[0]
    sf.index.write_bytes(with_crc(data[:24] + struct.pack("<qq", last + 1000 * 10**9, last)
                                  + data[40:]))
    for args in (["-i"], ["-c", "-i"]):
        r = subprocess.run([tool("npcapprintindex"), *args, str(sf.index)], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "damaged index (packet times" in r.stderr + r.stdout, r.stderr
    out = tmp_path / "out.pcap"
    r = subprocess.run([tool("npcapextract"), "-t", str(ds.root), "-b", "2025-11-21",
                        "-e", "2025-11-22", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(read_pcap(out)) == 150
    r = repair(ds.root)
    assert "rebuild index" in r.stdout, r.stdout
    assert_clean(ds.root)


def test_repair_never_changes_a_file_outside_the_dump_set_through_a_symlink(tmp_path):
    """files() and temp_files() listed symlinks, and repair truncated a torn one's target."""
    ds = make_dumpset(tmp_path / "ds")
    victim = tmp_path / "victim.pcap"
    sf = ds.files()[1]
    data = sf.pcap.read_bytes() + b"\x01" * 7  # a torn last record, which repair cuts off
    victim.write_bytes(data)
    sf.pcap.unlink()
    sf.pcap.symlink_to(victim)
    temp = ds.temp_path(999)  # as if the recorder were writing it
    temp.symlink_to(victim)
    repair(ds.root)
    assert victim.read_bytes() == data
    assert sf.pcap.is_symlink() and temp.is_symlink()  # neither placed nor followed
    assert [f.name for f in DumpSet.open(ds.root).files()] == [
        f.name for f in ds.files() if f.pcap != sf.pcap]


def test_a_lock_that_is_a_symlink_is_refused_and_leads_nowhere(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    (ds.root / ".lock").unlink(missing_ok=True)
    (ds.root / ".lock").symlink_to(tmp_path / "created-by-root")
    r = subprocess.run([tool("npcaprepair"), str(ds.root)], capture_output=True, text=True)
    one_line(r, 1, ".lock", prog="npcaprepair")
    assert not (tmp_path / "created-by-root").exists()


def test_a_file_named_after_the_next_free_microsecond_is_consistent(tmp_path):
    """Two files whose first packets share a microsecond: the second's name is the next one,
    after all its packets; repair took its index for another file's and rebuilt it on every
    run."""
    from pcapvault.index.pcapfile import pcap_bytes
    from pcapvault.recorder.indexer import index_and_link

    ds = DumpSet.create(tmp_path / "ds", interface="test0", linktype=1, snaplen=1536,
                        nanosecond=True)
    for k in range(2):
        first = BASE_NS + 100 + 300 * k
        temp = ds.temp_path(k)
        temp.write_bytes(pcap_bytes([(first + i, bytes(60)) for i in range(3)]))
        index_and_link(ds, ds.place(temp, first))
    assert [sf.first_ns for sf in ds.files()] == [BASE_NS, BASE_NS + 1000]
    assert_clean(ds.root)
    # Extraction used to distrust that index too: a warning, and a sequential scan.
    out = tmp_path / "out.pcap"
    r = subprocess.run([tool("npcapextract"), "-t", str(ds.root), "-b", "2025-11-21",
                        "-e", "2025-11-22", "-f", "ether host 0:0:0:0:0:0", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert len(read_pcap(out)) == 6
