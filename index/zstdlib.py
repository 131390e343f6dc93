"""The zstd binding for index sections: the standard library's, or its backport before 3.14.

pyzstd (0.19 and later) is itself built on this backport; its own import costs several times
the backport's (typing_extensions pulls in inspect and asyncio; docs/BENCHMARKS.md, D6), and
every extraction reads index sections before anything else. pyzstd stays the library for the
seekable compressed pcaps (index/compressed.py), imported only when one is met.
"""

from __future__ import annotations

try:
    from compression import zstd
except ImportError:  # Python < 3.14
    from backports import zstd

__all__ = ["zstd"]
