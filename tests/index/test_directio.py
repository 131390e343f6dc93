"""The core's O_DIRECT primitive (index/directio.py) and that each low-level I/O helper of
the recorder and extraction exists once: one ALIGN, one O_DIRECT read loop, one reader class."""

from __future__ import annotations

import ast
import mmap
import os
from pathlib import Path

import pytest

import pcapvault
from pcapvault.index.directio import ALIGN, WholeFileReader, open_direct, read_full

PACKAGE = Path(pcapvault.__path__[0])


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text())
            for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 17, 5 << 20])
def test_whole_file_reader_reads_every_byte(tmp_path: Path, size: int) -> None:
    """Whole files of aligned and unaligned sizes, the buffer reused and grown between them."""
    reader = WholeFileReader()
    for n in (size, size // 2, size):
        data = os.urandom(n)
        path = tmp_path / f"f{n}"
        path.write_bytes(data)
        got = reader.read(path)
        assert got is not None, "O_DIRECT refused on the test's filesystem"
        assert bytes(got) == data
        del got


def test_read_full_stops_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (2 * ALIGN + 5))
    fd = open_direct(path)
    assert fd is not None
    page = mmap.mmap(-1, 8 * ALIGN)  # page-aligned, as O_DIRECT wants
    try:
        assert read_full(fd, page, ALIGN) == ALIGN + 5
        assert page[: ALIGN + 5] == b"x" * (ALIGN + 5)
    finally:
        page.close()
        os.close(fd)


def test_no_direct_io_where_the_filesystem_refuses_it() -> None:
    """tmpfs refuses O_DIRECT: the caller gets None and reads the ordinary way."""
    shm = Path("/dev/shm")
    if os.statvfs(shm).f_bsize == 0 or not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = shm / f"pcapvault-directio-{os.getpid()}"
    path.write_bytes(b"y" * 100)
    try:
        fd = open_direct(path)
        if fd is not None:
            os.close(fd)
            pytest.skip("this kernel's tmpfs takes O_DIRECT")
        assert WholeFileReader().read(path) is None
    finally:
        path.unlink()


def test_align_is_defined_once() -> None:
    where = [name for name, tree in modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "ALIGN" for t in node.targets)]
    assert where == ["index/directio.py"]


def test_one_direct_reader() -> None:
    """O_DIRECT descriptors are opened in the core only, and one class is named DirectReader."""
    opens = [name for name, tree in modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "O_DIRECT"]
    classes = [name for name, tree in modules().items() for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name == "DirectReader"]
    assert set(opens) <= {"index/directio.py", "recorder/writer.py"}  # the writer writes
    assert len(classes) == 1
