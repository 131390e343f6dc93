"""Send the frames of pcap files raw on an interface (run inside the test namespace).

Writes every frame it managed to send to --out as [u32 length][bytes], so the test knows
exactly what crossed the wire; frames the kernel refuses (too short, over the MTU) are skipped.
"""

import argparse
import socket
import time

import dpkt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pps", type=int, default=0)
    ap.add_argument("pcaps", nargs="+")
    a = ap.parse_args()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((a.iface, 0))
    gap = 1.0 / a.pps if a.pps else 0.0
    with open(a.out, "wb") as out:
        for path in a.pcaps:
            with open(path, "rb") as f:
                for _ts, frame in dpkt.pcap.Reader(f):
                    if len(frame) < 14:
                        continue
                    try:
                        s.send(frame)
                    except OSError:
                        continue
                    out.write(len(frame).to_bytes(4, "little") + frame)
                    if gap:
                        time.sleep(gap)


if __name__ == "__main__":
    main()
