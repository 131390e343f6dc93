"""extract.heap: large temporaries come from the reused heap, not from fresh mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import numpy as np
from pcapvault.extract.heap import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1] != "default":  # an entry point, which must have set it up
    import importlib
    try:
        importlib.import_module(sys.argv[1]).main(["--version"])
    except SystemExit:
        pass
block = np.ones(64 << 17)  # 64 MiB, far above glibc's default mmap threshold
mapped = libc.mallinfo2().hblkhd
del block
print(mapped >= 64 << 20)
"""


@pytest.mark.parametrize("mode, mapped", [
    ("keep", "False"), ("default", "True"), ("pcapvault.extract.cli", "False"),
])
def test_large_blocks_come_from_the_heap(mode: str, mapped: str) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       timeout=60)
    if "mallinfo2" in r.stderr:
        pytest.skip("not glibc >= 2.33")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == mapped
