"""What importing pcapvault costs a fresh process (every command is one)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_numpy_starts_no_blas_threads():
    """OpenBLAS would start a spinning thread per core at numpy's import (index/__init__.py);
    after importing the engine and the recorder's capture the process has one thread."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    code = (
        "import os, pcapvault.extract.engine, pcapvault.recorder.capture, numpy; "
        "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "1"]
    env["OPENBLAS_NUM_THREADS"] = "2"  # an explicit choice is respected
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == "2"
