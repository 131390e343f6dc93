import pytest
from netns import veth_pair


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

@pytest.fixture
def small_ext4(tmp_path):
    """A 16 MB ext4 filesystem on a loop device (O_DIRECT, a real ENOSPC), removed after."""
    from fsutil import loop_fs

    with loop_fs(tmp_path, "16M") as mnt:
        yield mnt
