from pathlib import Path

import numpy as np
import pytest
from frames import CORPUS, corpus_files
from netns import veth_pair

from pcapvault.index.builder import build_index
from pcapvault.index.indexfile import flows_of_packets
from pcapvault.index.pcapfile import parse_global_header, pcap_bytes, scan_records


@pytest.fixture
def veth():
    with veth_pair() as pair:
        yield pair

@pytest.fixture(scope="module")
def world():
    """The PAM service's users, groups, dump set and running service (pamworld.py)."""
    from pamworld import make_world

    with make_world() as w:
        yield w


@pytest.fixture(scope="module")
def combined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """All corpus packets in one usec pcap, record i stamped i seconds, and their rows."""
    if not CORPUS.is_dir():
        pytest.skip(f"tcpdump test corpus not found at {CORPUS}")
    packets = []
    for path in corpus_files():
        data = path.read_bytes()
        t = scan_records(data, parse_global_header(data, str(path)))
        for off, cap, wire in zip(t.offset.tolist(), t.caplen.tolist(), t.wirelen.tolist(),
                                  strict=True):
            packets.append((len(packets) * 1_000_000_000, data[off + 16 : off + 16 + cap], wire))
    p = tmp_path_factory.mktemp("oracle") / "corpus.pcap"
    p.write_bytes(pcap_bytes(packets, nanosecond=False))
    return p, flows_of_packets(build_index(p))


@pytest.fixture
def small_ext4(tmp_path):
    """A 16 MB ext4 filesystem on a loop device (O_DIRECT, a real ENOSPC), removed after."""
    from fsutil import loop_fs

    with loop_fs(tmp_path, "16M") as mnt:
        yield mnt
