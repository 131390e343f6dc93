"""Moving many variable-length byte runs between numpy buffers without a Python loop.

The recorder assembles pcap records from ring blocks and disk2n fills its transmit ring from
pcap records; both move thousands of small pieces per call, which per-piece slicing in Python
would make the hot path.
"""

from __future__ import annotations

import numpy as np


def window(buf: np.ndarray, width: int) -> np.ndarray:
    """Every `width`-byte run of `buf` as one element: element i is buf[i:i+width], no copy.

    Elements are opaque `width`-byte values, so numpy moves each with one memcpy; a 2-D
    uint8 window would be copied byte by byte.
    """
    return np.ndarray(shape=(len(buf) - width + 1,), dtype=np.dtype((np.void, width)),
                      buffer=buf, strides=(1,))


def copy_pieces(src: np.ndarray, s: np.ndarray, dst: np.ndarray, d: np.ndarray,
                n: np.ndarray) -> None:
    """dst[d[i] : d[i] + n[i]] = src[s[i] : s[i] + n[i]] for every i (n >= 1)."""
    cls = np.frexp(n)[1] - 1  # W = 2**cls <= n < 2W
    lo, hi = int(cls.min()), int(cls.max())
    for k in range(lo, hi + 1):
        if lo == hi:
            ss, dd, nn = s, d, n
        else:
            sel = np.flatnonzero(cls == k)
            if not len(sel):
                continue
            ss, dd, nn = s[sel], d[sel], n[sel]
        first_n = int(nn[0])
        if (nn == first_n).all():
            # One length (fixed-size traffic, or one common size): a single row per piece.
            window(dst, first_n)[dd] = window(src, first_n)[ss]
            continue
        w = 1 << k
        sw, dw = window(src, w), window(dst, w)
        dw[dd] = sw[ss]
        tail = nn - w
        dw[dd + tail] = sw[ss + tail]
