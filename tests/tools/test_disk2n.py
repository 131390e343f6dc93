"""disk2n end to end: frames replayed on one end of a veth pair come back, in order and byte for
byte, from the recorder on the other end; rate modes keep their rate; every failure is one
line and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import dpkt
import numpy as np
import pytest
import recorderproc
from extract_helpers import build_dumpset, write_pcap
from netns import veth_pair
from recorderproc import CORPUS, RecorderProc, recorded_frames, tool

NS = 1_000_000_000
T0 = 1_763_737_200 * NS
MAC_A = bytes.fromhex("020000000002")
MAC_B = bytes.fromhex("020000000001")


def frame(i: int, size: int = 100, tpid: int | None = None, vid: int = 7) -> bytes:
    """A UDP frame numbered `i` (IP id and payload), `size` bytes, optionally VLAN tagged."""
    eth = MAC_A + MAC_B + (struct.pack("!HH", tpid, vid) if tpid else b"")
    body = struct.pack("!I", i)
    udp_len = max(8 + len(body), size - len(eth) - 2 - 20)
    udp = struct.pack("!HHHH", 4000 + i % 7, 5000, udp_len, 0) + body
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, i & 0xFFFF, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return (eth + b"\x08\x00" + ip + udp).ljust(size, b"\xab")[:size]


def write_frames(path: Path, frames: list[bytes], gap_ns: int = 100_000, t0: int = T0) -> None:
    write_pcap(path, [(t0 + i * gap_ns, f, len(f)) for i, f in enumerate(frames)])


def disk2n(pair, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", pair.tx_ns, tool("disk2n"), "-i", pair.tx,
                           "--stats-interval", "0", *args],
                          capture_output=True, text=True, timeout=timeout)


def replay_into_recorder(pair, ds: Path, *args: str) -> tuple[subprocess.CompletedProcess,
                                                               list[tuple[int, bytes, int]]]:
    """Run disk2n with a recorder on the other end; (disk2n's result, recorded packets)."""
    rec = RecorderProc(pair, ds, "--disk-limit", "1GB", "-s", "65535")
    r = disk2n(pair, *args)
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    return r, recorded_frames(ds)


def epoch(ns: int) -> str:
    return f"{ns // NS}.{ns % NS:09d}"


def paced_well(packets: list[tuple[int, bytes, int]], gap_ns: float) -> bool:
    """Frames arrived on a `gap_ns` grid: not faster than it overall, and half of them within
    10 ms of their place on it (a rate 7% off moves most of them further over the run)."""
    ts = np.array([t for t, _, _ in packets], np.int64)
    off = (ts - ts[0] - np.arange(len(ts)) * gap_ns).astype(np.float64)
    off -= np.median(off)
    span = (len(ts) - 1) * gap_ns
    return bool(np.median(np.abs(off)) < 10e6 and ts[-1] - ts[0] > 0.97 * span)


@pytest.fixture(scope="module")
def pair():
    with veth_pair() as p:
        yield p


@pytest.fixture(scope="module")
def recorded(pair, tmp_path_factory):
    """A dump set recorded by the real recorder: 1500 numbered frames, some VLAN tagged."""
    d = tmp_path_factory.mktemp("recorded")
    src = d / "in.pcap"
    frames = [frame(i, 60 + (i * 37) % 1400, tpid=0x8100 if i % 10 == 3 else None)
              for i in range(1500)]
    write_frames(src, frames)
    rec = RecorderProc(pair, d / "ds", "--disk-limit", "1GB", "-s", "65535", "-p", "0.2M")
    sent = pair.send([src], pps=20000)
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    got = recorded_frames(d / "ds")
    assert [f for _, f, _ in got] == sent == frames
    return d / "ds", got


def test_dumpset_window_replays_exactly(pair, recorded, tmp_path):
    ds, packets = recorded
    b, e = packets[100][0], packets[1400][0]
    r, got = replay_into_recorder(pair, tmp_path / "out", "-t", str(ds), "-b", epoch(b),
                                  "-e", epoch(e))
    assert r.returncode == 0, r.stderr
    assert [f for _, f, _ in got] == [f for _, f, _ in packets[100:1400]]
    # Original timing: the replay takes as long as the recording did.
    want = (packets[1399][0] - packets[100][0]) / NS
    took = (got[-1][0] - got[0][0]) / NS
    assert want * 0.8 - 0.05 < took < want * 2 + 1, (want, took)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("disk2n: done: ") and "sent 1300 packets" in last
    assert "timing error median" in last and "p99" in last and "max" in last


def test_dumpset_filter_uses_the_selection_engine(pair, recorded, tmp_path):
    ds, packets = recorded
    r, got = replay_into_recorder(pair, tmp_path / "out", "-t", str(ds), "-b", epoch(T0 - NS),
                                  "-e", "now", "-f", "udp src port 4003", "--speed", "4")
    assert r.returncode == 0, r.stderr
    want = [f for _, f, _ in packets
            if f[12:14] == b"\x08\x00" and struct.unpack_from("!H", f, 34)[0] == 4003]
    assert len(want) > 150 and [f for _, f, _ in got] == want


def test_two_dumpsets_merge_in_time_order(pair, tmp_path):
    a = [(T0 + i * 200_000, frame(i), 100) for i in range(0, 600, 2)]
    b = [(T0 + i * 200_000 + 50_000, frame(i), 100) for i in range(1, 600, 2)]
    build_dumpset(tmp_path / "a", a, per_file=70)
    build_dumpset(tmp_path / "b", b, per_file=90)
    r, got = replay_into_recorder(pair, tmp_path / "out", "-t", str(tmp_path / "a"), "-t",
                                  str(tmp_path / "b"), "-b", epoch(T0), "-e", epoch(T0 + NS))
    assert r.returncode == 0, r.stderr
    assert [f for _, f, _ in got] == [frame(i) for i in range(600)]


def corpus_frames(paths: list[Path], limit: int) -> tuple[list[bytes], int]:
    """What replaying `paths` must deliver (an independent reader: dpkt), and the runts."""
    out, runts = [], 0
    for p in paths:
        with open(p, "rb") as f:
            for _ts, data in dpkt.pcap.Reader(f):
                if len(data) < 14:
                    runts += 1
                elif len(data) <= limit or (len(data) <= limit + 4 and data[12:14] == b"\x81\x00"):
                    out.append(bytes(data))
    return out, runts


def test_corpus_playlist_comes_back_in_order(pair, tmp_path):
    files = sorted(CORPUS.glob("*.pcap"))
    if not files:
        pytest.skip(f"corpus not found at {CORPUS}")
    usable = []
    for p in files:
        try:
            with open(p, "rb") as f:
                if dpkt.pcap.Reader(f).datalink() == 1:
                    usable.append(p)
        except (ValueError, dpkt.NeedData):
            continue
    playlist = tmp_path / "corpus.txt"
    playlist.write_text("# the tcpdump test captures\n\n" + "".join(
        f"{os.path.relpath(p, tmp_path)}\n" for p in usable))
    r, got = replay_into_recorder(pair, tmp_path / "out", "-m", str(playlist), "--pps", "20000")
    assert r.returncode == 0, r.stderr
    want, runts = corpus_frames(usable, 9000 + 14)
    assert len(want) > 2500
    assert [f for _, f, _ in got] == want
    if runts:
        assert f"{runts} runts" in r.stderr


def test_pps_mbps_and_speed_hit_their_targets(pair, tmp_path):
    src = tmp_path / "in.pcap"
    write_frames(src, [frame(i, 500) for i in range(3000)], gap_ns=400_000)  # 2500 pps, 1.2 s
    for args, gap in ((["--pps", "5000"], 200_000), (["--mbps", "16"], 500 * 8 * 1e3 / 16),
                      (["--speed", "2"], 200_000)):
        # A shared machine stalls any sender (and the receiving softirq) now and then, for up
        # to a few hundred milliseconds: that displaces frames in one run, while a wrong rate
        # fails every run. So a mode passes when one of three runs is on its grid.
        for attempt in range(3):
            r, got = replay_into_recorder(pair, tmp_path / f"ds{args[0]}{attempt}", "-r",
                                          str(src), *args)
            assert r.returncode == 0, r.stderr
            assert [f for _, f, _ in got] == [frame(i, 500) for i in range(3000)]
            summary = r.stderr.strip().splitlines()[-1]
            assert "sent 3000 packets (1500000 bytes)" in summary
            reported = float(summary.split(" pps ")[0].rsplit(" ", 1)[1])
            assert reported * gap / NS < 1.02, summary  # a stall can only make it slower
            if paced_well(got, gap):
                break
        else:
            pytest.fail(f"{args}: frames off their {gap / 1e3:.0f} us grid in 3 runs: {summary}")


def test_topspeed_loops_and_rewrites_macs(pair, tmp_path):
    src = tmp_path / "in.pcap"
    frames = [frame(i, 64 + i % 900) for i in range(2000)]
    write_frames(src, frames)
    r, got = replay_into_recorder(pair, tmp_path / "ds", "-r", str(src), "--topspeed",
                                  "--loop", "3", "--src-mac", "0a:0b:0c:0d:0e:0f",
                                  "--dst-mac", "02-00-00-00-00-99")
    assert r.returncode == 0, r.stderr
    want = [bytes.fromhex("020000000099") + bytes.fromhex("0a0b0c0d0e0f") + f[12:]
            for f in frames] * 3
    assert [f for _, f, _ in got] == want
    assert "sent 6000 packets" in r.stderr and "at top speed" in r.stderr


def test_compressed_pcap_replays_like_the_plain_one(pair, tmp_path):
    from pcapvault.index.compressed import compress_file

    src = tmp_path / "in.pcap"
    frames = [frame(i, 60 + (i * 53) % 1400) for i in range(1500)]
    write_frames(src, frames)
    zst = tmp_path / "in.pcap.zst"
    compress_file(src, zst)
    r, got = replay_into_recorder(pair, tmp_path / "ds", "-r", str(zst), "-r", str(src),
                                  "--pps", "20000", "-f", "udp src port 4002")
    assert r.returncode == 0, r.stderr
    want = [f for i, f in enumerate(frames) if i % 7 == 2]
    assert [f for _, f, _ in got] == want * 2


def test_frames_over_the_mtu_are_skipped_or_fatal(tmp_path):
    with veth_pair(mtu=1500) as p:
        src = tmp_path / "in.pcap"
        frames = [
            frame(0, 1514),  # the largest untagged frame
            frame(1, 1515),  # one byte too many
            frame(2, 1518, tpid=0x8100),  # 802.1Q earns 4 bytes
            frame(3, 1519, tpid=0x8100),
            frame(4, 1518, tpid=0x88A8),  # 802.1ad does not (as the kernel decides)
            frame(5, 10),  # a runt
            frame(6, 60),
        ]
        write_frames(src, frames)
        r, got = replay_into_recorder(p, tmp_path / "ds", "-r", str(src))
        assert r.returncode == 0, r.stderr
        assert [f for _, f, _ in got] == [frames[0], frames[2], frames[6]]
        assert "skipped 3 over the MTU, 1 runts" in r.stderr
        r = disk2n(p, "-r", str(src), "--oversize", "fail")
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1
        assert "1515 bytes, more than pvtx accepts (1514 with MTU 1500)" in r.stderr
        assert r.stderr.startswith("disk2n: error: ")


def test_interface_errors_are_one_line(pair, tmp_path):
    src = tmp_path / "in.pcap"
    write_frames(src, [frame(i) for i in range(10)])

    def one_line(r: subprocess.CompletedProcess, text: str) -> None:
        recorderproc.one_line(r, 1, text, prog="disk2n")

    r = subprocess.run(["ip", "netns", "exec", pair.tx_ns, tool("disk2n"), "-i", "nosuch0",
                        "-r", str(src)], capture_output=True, text=True)
    one_line(r, "unknown interface 'nosuch0'")
    subprocess.run(["ip", "-n", pair.rx_ns, "link", "set", pair.rx, "down"], check=True)
    try:
        one_line(disk2n(pair, "-r", str(src)), "interface pvtx has no carrier")
        subprocess.run(["ip", "-n", pair.tx_ns, "link", "set", pair.tx, "down"], check=True)
        one_line(disk2n(pair, "-r", str(src)), "interface pvtx is down")
    finally:
        subprocess.run(["ip", "-n", pair.tx_ns, "link", "set", pair.tx, "up"], check=True)
        subprocess.run(["ip", "-n", pair.rx_ns, "link", "set", pair.rx, "up"], check=True)
        time.sleep(0.2)


def _without(*caps: str) -> list[str]:
    """A command prefix that runs as root without `caps` (root keeps the others)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux)")
    return ["setpriv", "--bounding-set=" + ",".join(f"-{c}" for c in caps), "--"]


def test_no_capability_and_unreadable_input(pair, tmp_path):
    src = tmp_path / "in.pcap"
    write_frames(src, [frame(i) for i in range(10)])
    cmd = ["ip", "netns", "exec", pair.tx_ns]
    args = [tool("disk2n"), "-i", pair.tx, "-r", str(src)]
    r = subprocess.run([*cmd, *_without("net_raw"), *args], capture_output=True, text=True)
    assert r.returncode == 1 and "needs CAP_NET_RAW" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    os.chmod(src, 0)
    r = subprocess.run([*cmd, *_without("dac_override", "dac_read_search"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot open: Permission denied" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "cannot open: No such file or directory"),
        (b"hello, not a capture at all", "not a pcap file"),
        (bytes.fromhex("0a0d0d0a1c0000004d3c2b1a01000000ffffffffffffffff1c000000"),
         "pcapng is not supported"),
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113), "is not Ethernet"),
    ],
)
def test_unusable_inputs_fail_before_sending(pair, tmp_path, make, message):
    bad = tmp_path / "bad.pcap"
    if make is not None:
        bad.write_bytes(make)
    good = tmp_path / "good.pcap"
    write_frames(good, [frame(i) for i in range(10)])
    r = disk2n(pair, "-r", str(good), "-r", str(bad))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "sent" not in r.stderr  # checked before the first frame left


def test_nothing_to_replay(pair, recorded, tmp_path):
    ds, packets = recorded
    r = disk2n(pair, "-t", str(ds), "-b", epoch(T0 - 2 * NS), "-e", epoch(T0 - NS),
               "--loop", "0")
    assert r.returncode == 1
    assert r.stderr.strip() == ("disk2n: error: nothing to replay: no packet of the dump set "
                                "matched the window and filter")


def test_sigint_stops_with_a_summary(pair, tmp_path):
    src = tmp_path / "in.pcap"
    write_frames(src, [frame(i) for i in range(1000)], gap_ns=1_000_000)
    p = subprocess.Popen(["ip", "netns", "exec", pair.tx_ns, tool("disk2n"), "-i", pair.tx,
                          "-r", str(src), "--loop", "0", "--stats-interval", "0.2"],
                         stderr=subprocess.PIPE, text=True)
    progress = [p.stderr.readline() for _ in range(3)]  # a line every 0.2 s while it runs
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert all(line.startswith("disk2n: pvtx: sent ") for line in progress), progress
    assert " pps " in progress[-1] and "p99" in progress[-1]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("disk2n: interrupted: pvtx: sent ")
    assert "Traceback" not in err


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_in_a_pause(pair, src: Path, sig: int) -> tuple[float, float, str, int]:
    """Start a replay of `src`, signal it during its pause: (share of a core used while it
    waited, seconds from the signal to its exit, its stderr, its exit status)."""
    p = subprocess.Popen(["ip", "netns", "exec", pair.tx_ns, tool("disk2n"), "-i", pair.tx,
                          "-r", str(src), "--stats-interval", "0.2"],
                         stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()  # progress lines come during the pause too
        assert first.startswith("disk2n: pvtx: sent 5 packets"), first
        time.sleep(0.3)
        cpu, wall = cpu_seconds(p.pid), time.monotonic()
        time.sleep(1.0)
        used = (cpu_seconds(p.pid) - cpu) / (time.monotonic() - wall)
        t = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=60)
        took = time.monotonic() - t
        return used, took, p.stderr.read(), p.returncode
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_ends_a_long_pause_at_once(pair, tmp_path, sig):
    """A 30 s gap in the original timing: disk2n sleeps through it (no spinning) and a signal
    ends the replay within 0.1 s, with the summary and exit status 0.

    Half of the usual 30-45 ms is the kernel releasing the TX ring (RCU grace periods), which
    a machine busy with other tests can stretch: up to three tries, one must make 0.1 s and
    none may take a second (spinning to the end of the gap took 28 s).
    """
    src = tmp_path / "gap.pcap"
    frames = [frame(i) for i in range(10)]
    write_pcap(src, [(T0 + i * 1000, f, len(f)) for i, f in enumerate(frames[:5])]
               + [(T0 + 30 * NS + i * 1000, f, len(f)) for i, f in enumerate(frames[5:])])
    times = []
    for _ in range(3):
        used, took, err, code = stop_in_a_pause(pair, src, sig)
        assert code == 0, err
        assert used < 0.2, f"{used:.0%} of a core while waiting"
        last = err.strip().splitlines()[-1]
        assert last.startswith("disk2n: interrupted: pvtx: sent 5 packets"), err
        assert "Traceback" not in err
        times.append(took)
        assert took < 1, f"exited {took:.3f} s after the signal"
        if took < 0.1:
            break
    assert min(times) < 0.1, f"exited {times} s after the signal"


def test_config_file_and_usage_errors(pair, tmp_path):
    src = tmp_path / "in.pcap"
    write_frames(src, [frame(i) for i in range(200)])
    conf = tmp_path / "disk2n-lab.conf"
    conf.write_text(f"# lab replay\n-i=nosuch0\n-r={src}\n--pps=20000\n--loop=2\n")
    r = subprocess.run(["ip", "netns", "exec", pair.tx_ns, tool("disk2n"), str(conf), "-i",
                        pair.tx], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sent 400 packets" in r.stderr and "at 20000 pps" in r.stderr
    conf.write_text("--topspeed\n--bogus=1\n")
    r = subprocess.run([tool("disk2n"), str(conf)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"disk2n: error: {conf}:2: unknown option '--bogus'; see disk2n " \
                               "--help"
    for args, text in (
        (["-r", str(src), "--pps", "10", "--topspeed"], "--pps and --topspeed contradict"),
        (["-r", str(src), "-t", str(tmp_path)], "not both"),
        (["-t", str(tmp_path)], "-b BEGIN -e END"),
        (["-r", str(src), "--dst-mac", "02:00"], "not a MAC address"),
        (["-r", str(src), "--max-gap", "inf"], "--max-gap"),
        (["-r", str(src), "--stats-interval", "1e300"], "--stats-interval"),
        (["-r", str(src), "--speed", "nan"], "'nan' is not a number"),
        (["-r", str(src), "--pps", "1e-300"], "--pps"),
        (["-r", str(src), "--mbps", "0"], "--mbps"),
        ([], "nothing to replay"),
    ):
        r = subprocess.run([tool("disk2n"), "-i", "lo", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr


def test_help_explains_the_loop_default():
    r = subprocess.run([tool("disk2n"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--loop 1 (play once) is the default" in text and "loops forever" in text
    assert "Examples:" in r.stdout
